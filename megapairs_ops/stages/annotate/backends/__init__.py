"""What every annotation backend takes and returns, and how one is chosen from a StepConfig.

A backend answers requests one at a time from coroutines (`adescribe`, `ainstruct`) inside a
`session()`; that is how the stage drives it. Backends that think in batches (a local model,
vLLM in-process) only implement the synchronous batch methods `describe` / `instruct`: the
default session gathers concurrent requests into batches and runs them on one worker thread.
A backend never raises for a single bad request: that request's Result carries an error kind
instead, and the stage turns it into a retry or a failure row.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, Sequence, TypeVar

from PIL import Image

from megapairs_ops.config import StepConfig
from megapairs_ops.stages.annotate.request_stats import RequestStats
from megapairs_ops.stages.annotate.types import (  # noqa: F401  (re-exported: what backends take and return)
    FINISH_FAILURES,
    STEPS,
    BackendError,
    DescribeRequest,
    EndpointUnavailable,
    ImageLoadError,
    InstructRequest,
    Result,
    completion_result,
)

DEFAULT_MAX_PIXELS = 100_000_000
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop (uvloop when installed: cheaper per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class Backend(ABC):
    kind: str = ""
    model_name: str = ""
    # Whether the instruct step should be asked for JSON instead of a numbered list.
    structured: bool = False
    # How long the batch adapter waits for more requests before running a partial batch.
    batch_linger_s: float = 0.01

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.stats = {step: RequestStats() for step in STEPS}
        self._batchers: dict[str, _Batcher] | None = None

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # -- synchronous batch API ---------------------------------------------------------------
    @abstractmethod
    def describe(self, requests: Sequence[DescribeRequest]) -> list[Result]: ...

    @abstractmethod
    def instruct(self, requests: Sequence[InstructRequest]) -> list[Result]: ...

    # -- asynchronous per-request API --------------------------------------------------------
    @asynccontextmanager
    async def session(self, max_batch: int = 256) -> AsyncIterator["Backend"]:
        """Per-event-loop resources; the default batches requests for the synchronous methods."""
        if self._batchers is not None:  # one object serving both steps: already open
            yield self
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.kind}-batch")
        self._batchers = {
            "describe": _Batcher(self.describe, self, "describe", max_batch, executor),
            "instruct": _Batcher(self.instruct, self, "instruct", max_batch, executor),
        }
        try:
            yield self
        finally:
            batchers, self._batchers = self._batchers, None
            for batcher in batchers.values():
                await batcher.drain()
            executor.shutdown(wait=True)

    async def adescribe(self, req: DescribeRequest) -> Result:
        return await self._batcher("describe").submit(req)

    async def ainstruct(self, req: InstructRequest) -> Result:
        return await self._batcher("instruct").submit(req)

    def _batcher(self, step: str) -> "_Batcher":
        if self._batchers is None:
            raise RuntimeError(f"{type(self).__name__}: call adescribe/ainstruct inside `async with backend.session()`")
        return self._batchers[step]

    def close(self) -> None:
        pass

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Batcher:
    """Collects concurrent requests into batches of up to `max_batch` for a synchronous batch
    method, run one batch at a time on a worker thread so the event loop stays free."""

    def __init__(
        self, fn: Callable[[list[Any]], list[Result]], backend: Backend, step: str, max_batch: int, executor: ThreadPoolExecutor
    ) -> None:
        self.fn = fn
        self.backend = backend
        self.stats = backend.stats[step]
        self.max_batch = max_batch
        self.executor = executor
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.running: set[asyncio.Task] = set()

    def submit(self, req: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.append((req, fut))
        if len(self.queue) >= self.max_batch:
            self._flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.backend.batch_linger_s, self._flush)
        return fut

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.queue:
            batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.fn, [req for req, _ in batch])
            if len(results) != len(batch):
                raise BackendError(f"{self.backend.kind}: {len(results)} results for {len(batch)} requests")
        except BaseException as exc:  # a broken backend stops the stage; single bad requests never get here
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        per_request = (time.perf_counter() - started) / max(len(batch), 1)
        for (_, fut), result in zip(batch, results):
            self.stats.observe(per_request, result.error, result.tokens_in, result.tokens_out)
            if not fut.done():
                fut.set_result(result)

    async def drain(self) -> None:
        self._flush()
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# Images in requests


def load_image(ref: str, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at `ref` as RGB, its longest side at most `max_side`; ImageLoadError otherwise."""
    from megapairs_ops.media import ImageRejected, load_rgb, read_image_bytes

    try:
        img = load_rgb(read_image_bytes(ref), max_pixels)
    except FileNotFoundError as exc:
        raise ImageLoadError("image_missing", f"{ref}: {exc}") from None
    except ImageRejected as exc:
        raise ImageLoadError(exc.reason, f"{ref}: {exc.detail}") from None
    except OSError as exc:
        raise ImageLoadError("image_unreadable", f"{ref}: {exc}") from None
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_data_url(ref: str, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    data = _jpeg_bytes(load_image(ref, max_side, max_pixels))
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def image_file_url(ref: str, max_side: int, cache_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """A file:// URL of the resized image for a server that shares the storage. The server gets
    the same pixels as with a data URL, written once to `cache_dir` (tar members and oversized
    originals cannot be handed over as they are)."""
    name = hashlib.sha256(f"{ref}\0{max_side}".encode()).hexdigest()[:32] + ".jpg"
    path = Path(cache_dir) / name[:2] / name
    if not path.is_file():
        data = _jpeg_bytes(load_image(ref, max_side, max_pixels))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path.resolve().as_uri()


# ---------------------------------------------------------------------------------------------


def make_backend(
    step: StepConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS, image_cache_dir: Path | None = None
) -> Backend:
    if step.backend == "template":
        from megapairs_ops.stages.annotate.backends.template import TemplateBackend

        return TemplateBackend()
    if step.backend == "openai":
        from megapairs_ops.stages.annotate.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(step, max_pixels=max_pixels, image_cache_dir=image_cache_dir)
    if step.backend == "transformers":
        from megapairs_ops.stages.annotate.backends.transformers_backend import TransformersBackend

        return TransformersBackend(step, max_pixels=max_pixels)
    if step.backend == "vllm":
        from megapairs_ops.stages.annotate.backends.vllm_backend import VLLMBackend

        return VLLMBackend(step, max_pixels=max_pixels)
    raise BackendError(f"unknown annotation backend '{step.backend}'")


def step_identity(step: StepConfig) -> tuple[str, str]:
    """(backend kind, model name) a step's records are keyed by, known without building it."""
    if step.backend == "template":
        from megapairs_ops.stages.annotate.backends.template import MODEL_NAME

        return "template", MODEL_NAME
    return step.backend, step.model or ""
