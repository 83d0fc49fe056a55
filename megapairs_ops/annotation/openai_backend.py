"""Any OpenAI-compatible chat endpoint (vllm serve, TGI, SGLang, a hosted API).

One shared httpx.Client (connection reuse), requests fanned out over a bounded thread pool.
Transient failures (429, 5xx, timeouts, dropped connections) are retried with exponential
backoff and full jitter, honouring Retry-After; everything else is returned as an error Result.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import httpx

from ..config import StepConfig
from .backends import (
    DEFAULT_MAX_PIXELS,
    Backend,
    BackendError,
    DescribeRequest,
    ImageLoadError,
    InstructRequest,
    Result,
    image_data_url,
)

HTTP_ATTEMPTS = 4
BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0

INSTRUCTIONS_JSON_SCHEMA = {
    "type": "object",
    "properties": {"instructions": {"type": "array", "items": {"type": "string"}, "minItems": 3}},
    "required": ["instructions"],
}


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(
        self,
        step: StepConfig,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        http_attempts: int = HTTP_ATTEMPTS,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        assert step.model and step.base_url  # StepConfig validation guarantees both
        self.step = step
        self.model_name = step.model
        # No StepConfig field for it yet: off unless a later config adds `structured_output`.
        self.structured = bool(getattr(step, "structured_output", False))
        self.max_pixels = max_pixels
        self.http_attempts = http_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._rng = random.Random()
        headers = {}
        if step.api_key_env:
            key = os.environ.get(step.api_key_env)
            if not key:
                raise BackendError(
                    f"annotate backend 'openai': environment variable {step.api_key_env} "
                    "(named by api_key_env) is not set or empty"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.url = step.base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.Client(
            timeout=step.timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=step.concurrency, max_keepalive_connections=step.concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=step.concurrency, thread_name_prefix="llm")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    # -- public batch API --------------------------------------------------------------------
    def describe(self, requests: Sequence[DescribeRequest]) -> list[Result]:
        self.count("describe", len(requests))
        return list(self._pool.map(self._describe_one, requests))

    def instruct(self, requests: Sequence[InstructRequest]) -> list[Result]:
        self.count("instruct", len(requests))
        return list(self._pool.map(self._instruct_one, requests))

    # -- one request -------------------------------------------------------------------------
    def _describe_one(self, req: DescribeRequest) -> Result:
        try:
            urls = [
                image_data_url(ref, self.step.image_max_side, self.max_pixels) for ref in (req.q_image, req.t_image)
            ]
        except ImageLoadError as exc:
            return Result(None, self.model_name, exc.reason, exc.detail, retryable=False)
        content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        content.append({"type": "text", "text": req.prompt})
        return self._chat([{"role": "user", "content": content}], req.seed)

    def _instruct_one(self, req: InstructRequest) -> Result:
        extra = {}
        if self.structured:
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "instructions", "schema": INSTRUCTIONS_JSON_SCHEMA},
            }
        return self._chat([{"role": "user", "content": req.prompt}], req.seed, extra)

    def _chat(self, messages: list[dict[str, Any]], seed: int, extra: dict | None = None) -> Result:
        payload = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": self.step.max_tokens,
            "temperature": self.step.temperature,
            "top_p": self.step.top_p,
            # vLLM and OpenAI accept a per-request seed: a re-run asks for the same sample.
            "seed": seed,
            **(extra or {}),
        }
        body, error, detail = self._post(payload)
        if body is None:
            return Result(None, self.model_name, error, detail)
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError) as exc:
            return Result(None, self.model_name, "bad_response", f"unexpected response shape: {exc!r}")
        model = body.get("model") if isinstance(body.get("model"), str) else self.model_name
        return Result(text, model)

    def _post(self, payload: dict[str, Any]) -> tuple[dict | None, str | None, str]:
        error, detail = "server_error", ""
        for attempt in range(1, self.http_attempts + 1):
            self.count("http_requests")
            wait: float | None = None
            try:
                resp = self._client.post(self.url, json=payload)
            except httpx.TimeoutException as exc:
                error, detail = "timeout", f"{type(exc).__name__} after {self.step.timeout_s}s"
            except httpx.TransportError as exc:
                error, detail = "connection_error", f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                    except ValueError:
                        return None, "bad_response", f"response is not JSON: {resp.text[:200]!r}"
                    if not isinstance(body, dict):
                        return None, "bad_response", f"response is not a JSON object: {resp.text[:200]!r}"
                    return body, None, ""
                snippet = resp.text[:200]
                if resp.status_code == 429 or resp.status_code >= 500:
                    error = "rate_limited" if resp.status_code == 429 else "server_error"
                    detail = f"HTTP {resp.status_code}: {snippet}"
                    wait = retry_after_seconds(resp.headers.get("retry-after"))
                else:
                    # 4xx other than 429: the request itself is wrong; repeating it cannot help.
                    return None, "http_error", f"HTTP {resp.status_code}: {snippet}"
            if attempt == self.http_attempts:
                break
            self.count("http_retries")
            backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            delay = self._rng.uniform(0, backoff)
            self._sleep(min(max(delay, wait or 0.0), self.max_backoff_s))
        return None, error, f"{detail} (gave up after {self.http_attempts} attempts)"
