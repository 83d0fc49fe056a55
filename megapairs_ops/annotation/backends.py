"""What every annotation backend takes and returns, and how one is chosen from a StepConfig.

A backend answers a whole batch of requests at once, so each can fan out (HTTP concurrency) or
batch (local generation) as suits it. It never raises for a single bad request: that request's
Result carries an error kind instead, and the stage turns it into a retry or a failure row.
"""

from __future__ import annotations

import base64
import io
import threading
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from ..config import StepConfig
from .prompts import stable_hash

DEFAULT_MAX_PIXELS = 100_000_000


class BackendError(RuntimeError):
    """A backend cannot be set up at all (missing API key, unknown backend): stops the stage."""


class _Seeded:
    seed_key: str

    @property
    def seed(self) -> int:
        return stable_hash(self.seed_key) % 2**31


@dataclass(frozen=True)
class DescribeRequest(_Seeded):
    pair_id: str
    seed_key: str  # pair, run seed and attempt: a retry is a fresh sample, a re-run the same one
    prompt: str
    word_num: int
    q_image: str  # image refs as written in images.parquet `path`
    t_image: str
    q_caption: str
    t_caption: str


@dataclass(frozen=True)
class InstructRequest(_Seeded):
    pair_id: str
    seed_key: str
    prompt: str
    description: str
    q_caption: str
    t_caption: str


@dataclass(frozen=True)
class Result:
    text: str | None
    model: str
    error: str | None = None  # snake_case kind: timeout, server_error, bad_response, corrupt_image, ...
    detail: str = ""
    # False when asking again cannot help (the image itself is unreadable).
    retryable: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class Backend(ABC):
    kind: str = ""
    model_name: str = ""
    # Whether the instruct step should be asked for JSON instead of a numbered list.
    structured: bool = False

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @abstractmethod
    def describe(self, requests: Sequence[DescribeRequest]) -> list[Result]: ...

    @abstractmethod
    def instruct(self, requests: Sequence[InstructRequest]) -> list[Result]: ...

    def close(self) -> None:
        pass

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageLoadError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_image(ref: str, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at `ref` as RGB, its longest side at most `max_side`; ImageLoadError otherwise."""
    from ..media import ImageRejected, load_rgb, read_image_bytes

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


def image_data_url(ref: str, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    img = load_image(ref, max_side, max_pixels)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_backend(step: StepConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Backend:
    if step.backend == "template":
        from .template import TemplateBackend

        return TemplateBackend()
    if step.backend == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(step, max_pixels=max_pixels)
    if step.backend == "transformers":
        from .transformers_backend import TransformersBackend

        return TransformersBackend(step, max_pixels=max_pixels)
    raise BackendError(f"unknown annotation backend '{step.backend}'")
