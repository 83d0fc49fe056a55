"""open_clip encoders (EVA02-CLIP, OpenAI and LAION CLIP checkpoints in open_clip format).

`model` names the checkpoint the way open_clip does: an architecture with `pretrained` (a tag
such as 'merged2b_s4b_b131k', found in the local hub cache, or a weights file), 'hf-hub:org/repo',
or a folder with open_clip_config.json and weights ('local-dir:/path' or just the path).
Loading goes through `open_clip.create_model_and_transforms` with `require_pretrained=True`: a
checkpoint without weights would embed randomly, so it is refused.

open_clip (and torch) are imported only when such an encoder is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megapairs_ops.config import EncoderConfig
from megapairs_ops.stages.embed.encoders import EncodeInputError, Encoder, EncoderLoadError, l2_normalise
from megapairs_ops.stages.embed.encoders.hf import (
    ProcessorPreprocessor,
    content_digest,
    pick_device,
    recipe_or_fallback,
    torch_dtype,
)

_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def model_reference(enc: EncoderConfig) -> tuple[str, str | None]:
    """(model_name, pretrained) as open_clip takes them; a bare local folder becomes local-dir:."""
    model = enc.model or ""
    if not model.startswith(("local-dir:", "hf-hub:")) and Path(model).expanduser().is_dir():
        model = f"local-dir:{Path(model).expanduser().resolve()}"
    pretrained = None if model.startswith(("local-dir:", "hf-hub:")) else enc.pretrained
    return model, pretrained


def _weights_digest(model: str, pretrained: str | None) -> str | None:
    if model.startswith("local-dir:"):
        return content_digest(model.removeprefix("local-dir:"))
    if pretrained and Path(pretrained).expanduser().is_file():
        return content_digest(pretrained)
    return None


class _TransformPreprocessor(ProcessorPreprocessor):
    """Fallback per-item half: open_clip's own torchvision transform (float CHW)."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.processor(image).numpy()


class OpenClipEncoder(Encoder):
    def __init__(self, enc: EncoderConfig, model, preprocess, tokenizer, device: str, dtype) -> None:
        import torch

        import open_clip
        from open_clip.transform import PreprocessCfg

        from megapairs_ops.stages.embed.encoders.pixels import recipe_from_open_clip

        self.name = enc.name
        self.modality = enc.modality
        self._model = model.eval()
        self._device = device
        self._dtype = dtype
        self._autocast = device == "cuda" and dtype != torch.float32
        self._tokenizer = tokenizer
        model_name, pretrained = model_reference(enc)
        preprocessing: dict[str, Any]
        if self.modality == "image":
            cfg = PreprocessCfg(**model.visual.preprocess_cfg)
            # preprocess_cfg already reflects image_size (open_clip resizes the model to it).
            recipe = recipe_from_open_clip(cfg, None)
            self._pre, preprocessing = recipe_or_fallback(recipe, _TransformPreprocessor(preprocess))
            preprocessing = {**preprocessing, "preprocess_cfg": model.visual.preprocess_cfg}
        else:
            preprocessing = {
                "tokenizer": type(tokenizer).__name__,
                "context_length": getattr(tokenizer, "context_length", None),
            }
        self.identity = {
            "kind": enc.kind,
            "model": model_name,
            "pretrained": pretrained,
            "revision": enc.revision,
            "content_digest": _weights_digest(model_name, pretrained),
            "open_clip": getattr(open_clip, "__version__", None),
            "dtype": str(dtype).removeprefix("torch."),
            "preprocessing": preprocessing,
        }
        probe = (
            self.encode_images([Image.new("RGB", (64, 64), (128, 128, 128))])
            if self.modality == "image"
            else self.encode_texts(["a photo"])
        )
        self.dim = int(probe.shape[1])

    def _run(self, fn, x) -> np.ndarray:
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=self._dtype, enabled=self._autocast):
            out = fn(x)
        return l2_normalise(out.float().cpu().numpy())

    # image side
    def image_preprocessor(self):
        if self.modality != "image":
            return super().image_preprocessor()
        return self._pre

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        if self.modality != "image":
            return super().prepare_image(image)
        try:
            return self._pre(image)
        except Exception as exc:  # noqa: BLE001 - one odd image must not fail the batch
            raise EncodeInputError("preprocess_failed", f"{type(exc).__name__}: {exc}") from exc

    # text side
    def prepare_text(self, text: str) -> str:
        if self.modality != "text":
            return super().prepare_text(text)
        if not isinstance(text, str) or not text.strip():
            raise EncodeInputError("empty_caption", "the caption is empty; the caption view has nothing to encode")
        return text

    def encode_prepared(self, items: list) -> np.ndarray:
        if not items:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        if self.modality == "text":
            return self.encode_batch(items)
        return self.encode_batch(self._pre.collate(items))

    def encode_batch(self, batch) -> np.ndarray:
        import torch

        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.modality == "text":
            # The tokenizer truncates to the model's context length, as open_clip does in training.
            tokens = self._tokenizer(list(batch)).to(self._device, non_blocking=True)
            return self._run(self._model.encode_text, tokens)
        with torch.inference_mode():
            if batch.dtype == torch.uint8:
                pixels = self._pre.to_model_input(batch, self._device, self._dtype)
            else:
                pixels = batch.to(self._device, self._dtype, non_blocking=True)
        return self._run(self._model.encode_image, pixels)


def build(enc: EncoderConfig) -> Encoder:
    import torch

    try:
        import open_clip
    except ImportError as exc:
        raise EncoderLoadError(
            f"encoder '{enc.name}' ({enc.kind}): the open_clip package is not installed ({exc}); "
            "install open_clip_torch (it is in the GPU worker image) or use a transformers kind (clip_image/clip_text)"
        ) from None
    device = pick_device(enc)
    dtype = torch_dtype(enc.dtype) if device == "cuda" else torch.float32
    model_name, pretrained = model_reference(enc)
    if pretrained is None and not model_name.startswith(("local-dir:", "hf-hub:")):
        raise EncoderLoadError(
            f"encoder '{enc.name}': open_clip architecture '{model_name}' needs 'pretrained' (a tag or a "
            "weights file); without weights it would embed randomly"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            precision=_PRECISION[str(dtype).removeprefix("torch.")],
            device=device,
            force_image_size=enc.image_size,
            require_pretrained=True,
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(model_name) if enc.modality == "text" else None
    except Exception as exc:  # noqa: BLE001 - every loading failure becomes one clear message
        where = f"'{enc.model}'" + (f" with pretrained '{enc.pretrained}'" if enc.pretrained else "")
        raise EncoderLoadError(
            f"encoder '{enc.name}' ({enc.kind}): cannot load open_clip model {where}: {type(exc).__name__}: {exc}"
        ) from exc
    return OpenClipEncoder(enc, model, preprocess, tokenizer, device, dtype)
