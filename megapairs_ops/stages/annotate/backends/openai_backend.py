"""Any OpenAI-compatible chat endpoint (vllm serve, TGI, SGLang, a gateway, a hosted API).

Async: one httpx.AsyncClient (one connection pool) per session, at most `concurrency` requests
in flight, a total deadline per request. Transient failures (429, 5xx, timeouts, dropped
connections) are re-sent with exponential backoff and full jitter; Retry-After pauses every
request, not just the one that got it. A circuit breaker notices when the endpoint is down
(`breaker_failures` failures in a row), holds all requests while one probe at a time checks
whether it is back, and does not charge the outage to any pair's attempts; if the outage
outlasts `outage_timeout_s` the work item stops (EndpointUnavailable) with every finished record
kept. Any other problem comes back as an error Result.

The API key comes from an Airflow connection or an environment variable, lives only in the
client's Authorization header, and is scrubbed from every detail text that leaves this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import certifi
import httpx

from megapairs_ops.config import StepConfig
from megapairs_ops.stages.annotate.backends import (
    DEFAULT_MAX_PIXELS,
    FINISH_FAILURES,
    Backend,
    BackendError,
    DescribeRequest,
    ImageLoadError,
    InstructRequest,
    Result,
    completion_result,
    image_data_url,
    image_file_url,
    run_async,
)
from megapairs_ops.stages.annotate.parsing import instructions_schema

from .breaker import CircuitBreaker, retry_after_seconds
from .endpoint import Endpoint, resolve_endpoint

log = logging.getLogger(__name__)


_SNIPPET = 200


class _Session:
    """The connection pool of one session: `concurrency` keep-alive connections, each request
    borrowing one, so the pool size is also the bound on requests in flight. Each connection is
    its own single-connection httpx client because httpcore's shared pool rescans every
    connection on every request event (quadratic in the pool size), which at 64 connections cost
    several ms of CPU per request."""

    def __init__(self, clients: list[httpx.AsyncClient], breaker: CircuitBreaker, images: ThreadPoolExecutor) -> None:
        self.clients = clients
        self.idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in clients:
            self.idle.put_nowait(client)
        self.breaker = breaker
        self.images = images


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(
        self,
        step: StepConfig,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_cache_dir: Path | None = None,
        endpoint: Endpoint | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        assert step.model  # StepConfig validation guarantees it
        self.step = step
        self.model_name = step.model
        self.structured = step.structured_output
        self.max_pixels = max_pixels
        self.endpoint = endpoint or resolve_endpoint(step)
        cache = step.image_cache_dir or image_cache_dir
        self.image_cache_dir = Path(cache) if cache else None
        if step.image_transport == "file" and self.image_cache_dir is None:
            raise BackendError("image_transport 'file' needs image_cache_dir (a folder the server can read)")
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._session: _Session | None = None
        # Built once: per request only the body changes (httpx would re-merge and re-parse them).
        self._url = httpx.URL(self.endpoint.chat_url)
        headers = {"Content-Type": "application/json"}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Bearer {self.endpoint.api_key}"
        self._headers = httpx.Headers(headers)
        self._breaker = CircuitBreaker(
            step.breaker_failures,
            step.breaker_cooldown_s,
            step.max_backoff_s,
            step.outage_timeout_s,
            lambda: list(self.stats.values()),
            name=f"openai {self.endpoint.base_url}",
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model_name!r}, base_url={self.endpoint.base_url!r}, key={self.endpoint.key_source})"

    def _scrub(self, text: str) -> str:
        key = self.endpoint.api_key
        return text.replace(key, "***") if key and key in text else text

    # -- sessions ----------------------------------------------------------------------------
    @asynccontextmanager
    async def session(self, max_batch: int = 256) -> AsyncIterator["OpenAIBackend"]:
        if self._session is not None:
            yield self
            return
        tls = ssl.create_default_context(cafile=certifi.where())  # built once, shared by all connections
        clients = [
            httpx.AsyncClient(
                verify=tls,
                # The total per-request deadline is enforced around each call; this is a backstop.
                timeout=httpx.Timeout(self.step.timeout_s * 2, connect=min(self.step.timeout_s, 30.0)),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            for _ in range(self.step.concurrency)
        ]
        images = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="llm-images")
        self._breaker.bind_loop()
        self._session = _Session(clients, self._breaker, images)
        try:
            yield self
        finally:
            self._session = None
            await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
            images.shutdown(wait=True)

    def _run_batch(self, fn: Callable[[Any], Awaitable[Result]], requests: Sequence[Any]) -> list[Result]:
        async def gather() -> list[Result]:
            async with self.session():
                return list(await asyncio.gather(*(fn(r) for r in requests)))

        return run_async(gather())

    # -- public API --------------------------------------------------------------------------
    def describe(self, requests: Sequence[DescribeRequest]) -> list[Result]:
        return self._run_batch(self.adescribe, requests)

    def instruct(self, requests: Sequence[InstructRequest]) -> list[Result]:
        return self._run_batch(self.ainstruct, requests)

    async def adescribe(self, req: DescribeRequest) -> Result:
        self.count("describe")
        session = self._require_session()
        loop = asyncio.get_running_loop()
        try:
            # Decoding, resizing and JPEG encoding are CPU work: keep them off the event loop.
            urls = await loop.run_in_executor(session.images, self._image_urls, req)
        except ImageLoadError as exc:
            return Result(None, self.model_name, exc.reason, exc.detail, retryable=False)
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        content.append({"type": "text", "text": req.prompt})
        return await self._chat("describe", [{"role": "user", "content": content}], req.seed)

    async def ainstruct(self, req: InstructRequest) -> Result:
        self.count("instruct")
        extra = {}
        if self.structured:
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "instructions", "schema": instructions_schema(req.min_instructions, req.max_chars)},
            }
        return await self._chat("instruct", [{"role": "user", "content": req.prompt}], req.seed, extra)

    # -- one request -------------------------------------------------------------------------
    def _require_session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("OpenAIBackend: call adescribe/ainstruct inside `async with backend.session()`")
        return self._session

    def _image_urls(self, req: DescribeRequest) -> list[str]:
        side = self.step.image_max_side
        if self.step.image_transport == "file":
            assert self.image_cache_dir is not None
            return [image_file_url(ref, side, self.image_cache_dir, self.max_pixels) for ref in (req.q_image, req.t_image)]
        return [image_data_url(ref, side, self.max_pixels) for ref in (req.q_image, req.t_image)]

    async def _chat(self, step: str, messages: list[dict[str, Any]], seed: int, extra: dict | None = None) -> Result:
        payload: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": self.step.max_tokens,
            "temperature": self.step.temperature,
            "top_p": self.step.top_p,
            # vLLM and OpenAI accept a per-request seed: a re-run asks for the same sample.
            "seed": seed,
            **(extra or {}),
        }
        if self.step.stop:
            payload["stop"] = list(self.step.stop)
        body, error, detail = await self._post(step, json.dumps(payload).encode())
        if body is None:
            return Result(None, self.model_name, error, self._scrub(detail))
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens_in, tokens_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.stats[step].add_tokens(tokens_in, tokens_out)
        model = body.get("model") if isinstance(body.get("model"), str) else self.model_name
        try:
            choice = body["choices"][0]
            text, finish = choice["message"].get("content"), choice.get("finish_reason")
            if finish not in FINISH_FAILURES and not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            self.stats[step].count_error("bad_response")
            return Result(None, self.model_name, "bad_response", self._scrub(f"unexpected response shape: {exc!r}"))
        result = completion_result(text, model, finish, self.step.max_tokens, tokens_in, tokens_out)
        if result.error:
            self.stats[step].count_error(result.error)
        return result

    async def _post(self, step: str, payload: bytes) -> tuple[dict | None, str | None, str]:
        session = self._require_session()
        stats = self.stats[step]
        breaker = session.breaker
        error, detail = "server_error", ""
        attempt = 0
        while True:
            probe = await breaker.acquire(stats)
            endpoint_failure = False
            client = await session.idle.get()
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.step.timeout_s):
                    resp = await client.send(httpx.Request("POST", self._url, headers=self._headers, content=payload))
                    raw = resp.content
            except (TimeoutError, httpx.TimeoutException):
                error, detail = "timeout", f"no complete response within {self.step.timeout_s:g}s"
                endpoint_failure = True
            except httpx.TransportError as exc:
                error, detail = "connection_error", f"{type(exc).__name__}: {exc}"
                endpoint_failure = True
            except BaseException:
                breaker.abandon_probe()
                raise
            finally:
                session.idle.put_nowait(client)
            elapsed = time.perf_counter() - started
            if not endpoint_failure:
                status = resp.status_code
                if status == 200:
                    breaker.success(probe)
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = None
                    if not isinstance(body, dict):
                        stats.observe(elapsed, "bad_response")
                        return None, "bad_response", f"response is not a JSON object: {raw[:_SNIPPET]!r}"
                    stats.observe(elapsed)
                    return body, None, ""
                snippet = raw[:_SNIPPET].decode("utf-8", "replace")
                if status in (401, 403):
                    stats.observe(elapsed, "auth_error")
                    breaker.abandon_probe()
                    raise BackendError(
                        f"{self.endpoint.base_url} rejected the credentials (HTTP {status}, key from "
                        f"{self.endpoint.key_source}): {self._scrub(snippet)}"
                    )
                if status == 404:
                    # vLLM and OpenAI answer 404 for a model the endpoint does not serve (and any
                    # server for a wrong path): every request would get it.
                    stats.observe(elapsed, "not_found")
                    breaker.abandon_probe()
                    raise BackendError(
                        f"annotate.{step}.model: {self.endpoint.chat_url} answered HTTP 404 for model "
                        f"'{self.model_name}': {self._scrub(snippet)}; check the model name (GET /v1/models "
                        "lists what the server serves) and base_url"
                    )
                if status == 429:
                    error, detail = "rate_limited", f"HTTP 429: {snippet}"
                    wait = retry_after_seconds(resp.headers.get("retry-after"))
                    # Everyone would get the same answer: hold all requests (this one included,
                    # in breaker.acquire), not just this one.
                    pause = self.step.backoff_s if wait is None else wait
                    breaker.pause(min(pause, self.step.max_backoff_s))
                    breaker.success(probe)  # the server is up, only busy
                elif status >= 500:
                    error, detail = "server_error", f"HTTP {status}: {snippet}"
                    endpoint_failure = True
                else:
                    # Other 4xx: this request itself is wrong; repeating it cannot help.
                    stats.observe(elapsed, "http_error")
                    breaker.success(probe)
                    return None, "http_error", f"HTTP {status}: {snippet}"
            stats.observe(elapsed, error)
            # Failures while the endpoint counts as down are the outage's, not this request's.
            if not (endpoint_failure and breaker.failure(probe)):
                attempt += 1
            if attempt >= self.step.http_attempts:
                return None, error, f"{detail} (gave up after {self.step.http_attempts} attempts)"
            stats.retried()
            if error == "rate_limited":
                continue  # the pause set above is the wait
            backoff = min(self.step.max_backoff_s, self.step.backoff_s * 2 ** max(attempt - 1, 0))
            delay = self._rng.uniform(0, backoff)
            if delay > 0:
                await self._sleep(delay)
