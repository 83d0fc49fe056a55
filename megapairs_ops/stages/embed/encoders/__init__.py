"""Encoders: one similarity view each, mapping images or captions to L2-normalised float32 vectors.

`build_encoder(enc)` turns an `EncoderConfig` into a ready `Encoder`. Weight-free kinds live in
`classic` (numpy + Pillow only); model-backed kinds live in `hf` (transformers) and `openclip`
(open_clip) and import torch only when built, so importing this package stays cheap for DAG
parsing. The `precomputed` kind has no encoder: its vectors are read by `precomputed`.

Per-item work is split from batch work: `prepare_image`/`prepare_text` may raise `EncodeInputError`
for one bad item (the embed stage quarantines it), while `encode_prepared` runs the batch and any
error there is the encoder's problem, not the input's, and is allowed to fail the task.

For throughput the embed stage runs the per-item half in decode worker processes:
`image_preprocessor()` is a picklable callable (image -> item) with a `collate(items) -> batch`
that also runs in the worker, and `encode_batch(batch)` runs the model on the collated batch.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from PIL import Image

from megapairs_ops.config import EncoderConfig
from megapairs_ops.errors import PermanentError


class EncodeInputError(ValueError):
    """One input item cannot be encoded by this view; `reason` is a snake_case code for quarantine."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EncoderLoadError(PermanentError, RuntimeError):
    """The encoder's model could not be loaded; the message says which encoder, model and what to do."""


# The device each encoder kind wants: "gpu-preferred" kinds run on a GPU work item (the embed
# stage routes them to the GPU queue and pool) unless the encoder's `device` says cpu.
EncoderDevice = Literal["cpu", "gpu-preferred"]
_DEVICES: dict[str, EncoderDevice] = {
    "classic_color_layout": "cpu",
    "classic_texture": "cpu",
    "classic_text_hash": "cpu",
    "clip_image": "gpu-preferred",
    "clip_text": "gpu-preferred",
    "dinov2": "gpu-preferred",
    "open_clip_image": "gpu-preferred",
    "open_clip_text": "gpu-preferred",
    "precomputed": "cpu",
}


def kind_device(kind: str) -> EncoderDevice:
    try:
        return _DEVICES[kind]
    except KeyError:
        raise KeyError(f"unknown encoder kind '{kind}' (known: {sorted(_DEVICES)})") from None


class Encoder:
    """Base class: subclasses set `name`, `modality`, `dim`, `identity` and implement prepare/encode."""

    name: str
    modality: Literal["image", "text"]
    dim: int
    # Everything that changes the vectors; a cached embedding is reusable only under an equal identity.
    identity: dict[str, Any]

    def prepare_image(self, image: Image.Image) -> Any:
        raise TypeError(f"encoder '{self.name}' encodes {self.modality}, not images")

    def prepare_text(self, text: str) -> Any:
        raise TypeError(f"encoder '{self.name}' encodes {self.modality}, not texts")

    def encode_prepared(self, items: list[Any]) -> np.ndarray:
        """(n, dim) float32 with unit rows; an empty list gives a (0, dim) array."""
        raise NotImplementedError

    def image_preprocessor(self) -> "ItemPreprocessor":
        """The per-item half, picklable for decode workers; by default `prepare_image` itself."""
        return ItemPreprocessor(self)

    def encode_batch(self, batch: Any) -> np.ndarray:
        """Encode what `image_preprocessor().collate` (or a list of prepared texts) made."""
        return self.encode_prepared(list(batch))

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_prepared([self.prepare_image(im) for im in images])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode_prepared([self.prepare_text(t) for t in texts])


class ItemPreprocessor:
    """Runs an encoder's `prepare_image` in a worker; only for encoders that pickle cheaply."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def __call__(self, image: Image.Image) -> Any:
        return self.encoder.prepare_image(image)

    @staticmethod
    def collate(items: list[Any]) -> list[Any]:
        return list(items)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def build_encoder(enc: EncoderConfig) -> Encoder:
    if enc.kind.startswith("classic_"):
        from megapairs_ops.stages.embed.encoders import classic

        return classic.build(enc)
    if enc.kind.startswith("open_clip_"):
        from megapairs_ops.stages.embed.encoders import openclip

        return openclip.build(enc)
    if enc.kind == "precomputed":
        raise TypeError(f"encoder '{enc.name}' is precomputed: its vectors are read, not computed")
    from megapairs_ops.stages.embed.encoders import hf

    return hf.build(enc)


__all__ = [
    "EncodeInputError",
    "Encoder",
    "EncoderLoadError",
    "ItemPreprocessor",
    "EncoderDevice",
    "build_encoder",
    "kind_device",
    "l2_normalise",
]
