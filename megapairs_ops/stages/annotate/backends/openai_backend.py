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
import email.utils
import json
import logging
import os
import random
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import certifi
import httpx

from megapairs_ops.config import StepConfig
from megapairs_ops.stages.annotate.backends import (
    DEFAULT_MAX_PIXELS,
    Backend,
    BackendError,
    DescribeRequest,
    EndpointUnavailable,
    FINISH_FAILURES,
    ImageLoadError,
    InstructRequest,
    Result,
    completion_result,
    image_data_url,
    image_file_url,
    run_async,
)
from megapairs_ops.stages.annotate.parsing import instructions_schema
from megapairs_ops.stages.annotate.request_stats import RequestStats

log = logging.getLogger(__name__)

_SNIPPET = 200


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


# ---------------------------------------------------------------------------------------------
# Endpoint and credentials


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    key_source: str = "none"  # "connection:<id>", "env:<NAME>" or "none": safe to log

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


class EndpointConfigError(BackendError):
    """The endpoint or its key cannot be resolved from the step's config; `field` names the
    StepConfig key to fix (connection_id, api_key_env or base_url)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.field, str(self))


def _airflow_connection(conn_id: str) -> Any:
    try:
        from airflow.sdk import Connection
    except ImportError as exc:
        raise EndpointConfigError("connection_id", f"connection_id '{conn_id}' needs Airflow installed ({exc})") from None
    try:
        return Connection.get(conn_id)
    except Exception as exc:  # AirflowNotFoundException and secrets-backend errors
        raise EndpointConfigError(
            "connection_id", f"Airflow connection '{conn_id}' could not be read: {type(exc).__name__}"
        ) from None


def _connection_base_url(conn: Any) -> str | None:
    extra = conn.extra_dejson if conn.extra else {}
    if extra.get("base_url"):
        return str(extra["base_url"])
    host = (conn.host or "").strip()
    if not host:
        return None
    if "://" in host:
        return host
    scheme = "https" if conn.conn_type in ("https",) else "http"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}/{(conn.schema or 'v1').strip('/')}"


def resolve_endpoint(step: StepConfig) -> Endpoint:
    """base_url from the config, else from the Airflow connection; the key from the connection's
    password (or its extra `api_key`), else from the environment variable `api_key_env`."""
    base_url, key, source = step.base_url, None, "none"
    if step.connection_id:
        conn = _airflow_connection(step.connection_id)
        base_url = base_url or _connection_base_url(conn)
        key = conn.password or (conn.extra_dejson.get("api_key") if conn.extra else None)
        if key:
            source = f"connection:{step.connection_id}"
    if not key and step.api_key_env:
        key = os.environ.get(step.api_key_env)
        if not key:
            raise EndpointConfigError(
                "api_key_env",
                f"annotate backend 'openai': environment variable {step.api_key_env} "
                "(named by api_key_env) is not set or empty",
            )
        source = f"env:{step.api_key_env}"
        # Inside an Airflow worker, have the task log redact it too (never import Airflow for this).
        if "airflow.sdk" in sys.modules:
            try:
                from airflow.sdk.log import mask_secret

                mask_secret(key)
            except Exception:
                pass
    if not base_url:
        raise EndpointConfigError(
            "base_url",
            f"annotate backend 'openai': no endpoint; set base_url or give connection '{step.connection_id}' a host",
        )
    return Endpoint(base_url, key or None, source)


# ---------------------------------------------------------------------------------------------
# Circuit breaker


class CircuitBreaker:
    """Shared by all requests of one endpoint. Closed: requests flow. After `threshold`
    consecutive failures it opens for `cooldown_s` (doubling on each failed probe, up to
    `max_cooldown_s`); then one probe request at a time goes through until one succeeds.
    `pause(seconds)` (a Retry-After) holds every request without counting as a failure."""

    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        max_cooldown_s: float,
        outage_timeout_s: float,
        stats: Callable[[], list[RequestStats]],
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown_s
        self.cooldown = cooldown_s
        self.max_cooldown = max(max_cooldown_s, cooldown_s)
        self.outage_timeout = outage_timeout_s
        self.clock = clock
        self.name = name
        self._stats = stats
        self.consecutive = 0
        self.is_open = False
        self.open_until = 0.0
        self.not_before = 0.0
        self.down_since: float | None = None
        self.probing = False
        self._changed: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        event = self._event()
        event.set()
        self._changed = asyncio.Event()

    async def acquire(self, stats: RequestStats) -> bool:
        """Wait until a request may be sent; True when it is the probe of an open breaker."""
        waited_from = None
        try:
            while True:
                now = self.clock()
                if self.is_open and self.down_since is not None and now - self.down_since > self.outage_timeout:
                    raise EndpointUnavailable(
                        f"{self.name}: endpoint down for {now - self.down_since:.0f}s "
                        f"(outage_timeout_s={self.outage_timeout:g}); finished records are kept"
                    )
                wake = max(self.not_before, self.open_until if self.is_open else 0.0)
                if now >= wake:
                    if not self.is_open:
                        return False
                    if not self.probing:
                        self.probing = True
                        return True
                    wake = now + self.cooldown  # wait for the probe's verdict, re-check now and then
                if waited_from is None:
                    waited_from = now
                try:
                    await asyncio.wait_for(self._event().wait(), timeout=max(wake - now, 0.001))
                except asyncio.TimeoutError:
                    pass
        finally:
            if waited_from is not None:
                stats.paused(self.clock() - waited_from)

    def success(self, probe: bool) -> None:
        self.consecutive = 0
        self.down_since = None
        if probe or self.is_open:
            self.is_open = False
            self.probing = False
            self.cooldown = self.base_cooldown
            log.info("%s: endpoint answers again; circuit closed", self.name)
            self._notify()

    def failure(self, probe: bool) -> bool:
        """Record an endpoint failure; True when the endpoint now counts as down."""
        now = self.clock()
        self.consecutive += 1
        if self.down_since is None:
            self.down_since = now
        if probe:
            self.probing = False
            self.open_until = now + self.cooldown
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._notify()
            return True
        if self.is_open:
            return True
        if self.consecutive >= self.threshold:
            self.is_open = True
            self.open_until = now + self.cooldown
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            for stats in self._stats():
                stats.breaker_opened()
            log.warning(
                "%s: %d failures in a row; pausing all requests (circuit open for %.1fs)",
                self.name, self.consecutive, self.open_until - now,
            )
            self._notify()
            return True
        return False

    def bind_loop(self) -> None:
        """A new session runs on a new event loop; waiters of the old one are gone."""
        self._changed = None
        self.probing = False

    def abandon_probe(self) -> None:
        if self.probing:
            self.probing = False
            self._notify()

    def pause(self, seconds: float) -> None:
        self.not_before = max(self.not_before, self.clock() + seconds)


# ---------------------------------------------------------------------------------------------


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
