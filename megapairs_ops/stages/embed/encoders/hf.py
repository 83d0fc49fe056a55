"""Model-backed encoders loaded with transformers `from_pretrained`: CLIP image/text towers and DINOv2.

torch and transformers are imported inside functions: this module is imported only when such an
encoder is built, never while Airflow parses DAGs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megapairs_ops.config import EncoderConfig
from megapairs_ops.stages.embed.encoders import EncodeInputError, Encoder, EncoderLoadError, l2_normalise


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def pick_device(enc: EncoderConfig) -> str:
    import torch

    if enc.device == "cuda" and not torch.cuda.is_available():
        raise EncoderLoadError(
            f"encoder '{enc.name}': device 'cuda' requested but no CUDA device is visible; "
            "set device: auto or cpu, or run the task on a GPU worker"
        )
    if enc.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return enc.device


def _load_error(enc: EncoderConfig, exc: Exception) -> EncoderLoadError:
    where = f"'{enc.model}'" + (f" at revision '{enc.revision}'" if enc.revision else "")
    return EncoderLoadError(
        f"encoder '{enc.name}' ({enc.kind}): cannot load model {where}: {type(exc).__name__}: {exc}. "
        "Point 'model' at a directory written by save_pretrained() or at a hub id present in the local cache."
    )


def _hub_kwargs(enc: EncoderConfig) -> dict[str, Any]:
    return {"revision": enc.revision, "trust_remote_code": enc.trust_remote_code}


def _load_config(enc: EncoderConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(enc.model, **_hub_kwargs(enc))
    except Exception as exc:  # noqa: BLE001 - every loading failure becomes one clear message
        raise _load_error(enc, exc) from exc


def _load_model(cls, enc: EncoderConfig, dtype, **kwargs):
    from transformers.utils import logging as hf_logging

    # Loading one tower of a full CLIP checkpoint reports the other tower's weights as "unexpected";
    # that report is noise here, while missing weights (which would be random) are checked below.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a per-weight bar per task is log noise in Airflow
    try:
        model, info = cls.from_pretrained(
            enc.model,
            use_safetensors=True,
            dtype=dtype,
            output_loading_info=True,
            **_hub_kwargs(enc),
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001
        raise _load_error(enc, exc) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise EncoderLoadError(
            f"encoder '{enc.name}': checkpoint '{enc.model}' lacks {len(missing)} weights the "
            f"{cls.__name__} needs (e.g. {missing[:3]}); they would be random, so refusing to embed with it"
        )
    return model.eval()


def content_digest(model: str) -> str | None:
    """For a local directory or file, a digest of its bytes: content, not path, decides cache reuse."""
    root = Path(model).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _settings_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _HFEncoder(Encoder):
    def __init__(self, enc: EncoderConfig, model, config, device: str, dtype, preprocessing: dict) -> None:
        import torch

        self.name = enc.name
        self.modality = enc.modality
        self._model = model.to(device)
        self._device = device
        self._dtype = dtype
        self._autocast = device == "cuda" and dtype != torch.float32
        self.identity = {
            "kind": enc.kind,
            "model": enc.model,
            "revision": enc.revision or getattr(config, "_commit_hash", None),
            "content_digest": content_digest(enc.model),
            "dtype": str(dtype).removeprefix("torch."),
            "preprocessing": preprocessing,
        }
        self.dim = int(self._probe_dim())

    def _forward(self, batch: dict):
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=self._dtype, enabled=self._autocast):
            out = self._features(**{k: v.to(self._device, non_blocking=True) for k, v in batch.items()})
        # L2 normalisation in float32: half precision loses the last digits that ranking relies on.
        return l2_normalise(out.float().cpu().numpy())

    def _features(self, **inputs):
        raise NotImplementedError

    def _probe_dim(self) -> int:
        raise NotImplementedError


def _as_tensor(out):
    """Feature getters return a tensor in older transformers and a ModelOutput with pooler_output in v5."""
    return out if hasattr(out, "shape") else out.pooler_output


class ProcessorPreprocessor:
    """Fallback per-item half for processors a PixelRecipe does not cover: the processor itself."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.processor(images=[image], return_tensors="np")["pixel_values"][0]

    @staticmethod
    def collate(items: list[np.ndarray]):
        import torch

        return torch.from_numpy(np.stack(items))


_PROBE_PIXELS = np.add.outer(np.arange(41), np.arange(67))[..., None] * np.array([3, 5, 7]) % 256


def recipe_or_fallback(recipe, fallback: ProcessorPreprocessor) -> tuple[object, dict]:
    """The recipe when it reproduces the reference preprocessing on a probe image, else the reference."""
    if recipe is None:
        return fallback, {"processor_fallback": True}
    probe = Image.fromarray(_PROBE_PIXELS.astype(np.uint8))
    via_recipe = recipe.to_model_input(recipe.collate([recipe(probe)]), "cpu", torch_dtype("float32")).numpy()
    reference = fallback(probe)[None]
    if via_recipe.shape != reference.shape or np.abs(via_recipe - reference).max() > 1e-3:
        return fallback, {"processor_fallback": True}
    return recipe, recipe.describe()


class _ImageEncoder(_HFEncoder):
    def __init__(self, enc, model, config, device, dtype, processor, pooling: str) -> None:
        from megapairs_ops.stages.embed.encoders.pixels import recipe_from_hf_processor

        self._processor = processor
        self._interpolate = self._needs_interpolation(enc, config)
        # image_size changes the processor's sizes too, so the fallback only serves native sizes.
        recipe = recipe_from_hf_processor(processor, enc.image_size)
        if enc.image_size is not None and recipe is None:
            raise EncoderLoadError(
                f"encoder '{enc.name}': image_size is not supported with {type(processor).__name__}; remove it"
            )
        self._pre, described = (
            recipe_or_fallback(recipe, ProcessorPreprocessor(processor))
            if enc.image_size is None
            else (recipe, recipe.describe())
        )
        preprocessing = {
            "processor": type(processor).__name__,
            "settings": _settings_digest(processor.to_dict()),
            "pixels": described,
            "pooling": pooling,
        }
        super().__init__(enc, model, config, device, dtype, preprocessing)

    @staticmethod
    def _needs_interpolation(enc: EncoderConfig, config) -> bool:
        vision = getattr(config, "vision_config", None) or config
        return enc.image_size is not None and enc.image_size != getattr(vision, "image_size", enc.image_size)

    def image_preprocessor(self):
        return self._pre

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        try:
            return self._pre(image)
        except Exception as exc:  # noqa: BLE001 - one odd image must not fail the batch
            raise EncodeInputError("preprocess_failed", f"{type(exc).__name__}: {exc}") from exc

    def encode_prepared(self, items: list[np.ndarray]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_batch(self._pre.collate(items))

    def encode_batch(self, batch) -> np.ndarray:
        import torch

        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            if batch.dtype == torch.uint8:
                pixels = self._pre.to_model_input(batch, self._device, self._dtype)
            else:
                pixels = batch.to(self._device, self._dtype, non_blocking=True)
        return self._forward({"pixel_values": pixels})

    def _probe_dim(self) -> int:
        return self.encode_images([Image.new("RGB", (64, 64), (128, 128, 128))]).shape[1]


class ClipImageEncoder(_ImageEncoder):
    def _features(self, pixel_values):
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        if hasattr(self._model, "get_image_features"):
            return _as_tensor(self._model.get_image_features(pixel_values=pixel_values, **extra))
        return self._model(pixel_values=pixel_values, **extra).image_embeds


class Dinov2Encoder(_ImageEncoder):
    def _features(self, pixel_values):
        out = self._model(pixel_values=pixel_values)
        # DINOv2's image-level self-distillation loss is applied to the CLS token, so the CLS token after
        # the final layernorm (Dinov2Model's pooler_output) is the global descriptor the model was
        # trained to make comparable across images, and the one DINO-style k-NN evaluation compares.
        # Mean-pooled patch tokens would mostly measure layout, which the CLIP view already covers.
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class ClipTextEncoder(_HFEncoder):
    def __init__(self, enc, model, config, device, dtype, tokenizer, max_length: int) -> None:
        self._tokenizer = tokenizer
        self._max_length = max_length
        preprocessing = {
            "tokenizer": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "max_length": max_length,
            "truncation": True,
            "pooling": "get_text_features" if hasattr(model, "get_text_features") else "projected_eos",
        }
        super().__init__(enc, model, config, device, dtype, preprocessing)

    def prepare_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise EncodeInputError("empty_caption", "the caption is empty; the caption view has nothing to encode")
        return text

    def encode_prepared(self, items: list[str]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), np.float32)
        tokens = self._tokenizer(
            items, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        return self._forward({key: tokens[key] for key in ("input_ids", "attention_mask")})

    def _features(self, input_ids, attention_mask):
        if hasattr(self._model, "get_text_features"):
            out = self._model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return _as_tensor(out)
        return self._model(input_ids=input_ids, attention_mask=attention_mask).text_embeds

    def _probe_dim(self) -> int:
        return self.encode_texts(["a photo"]).shape[1]


def _clip_tower(enc: EncoderConfig, config, tower: str):
    """The model class and config for one CLIP tower, loading only that tower's weights.

    A full CLIP checkpoint's tower sub-config does not always carry the top-level projection size,
    so it is copied down; non-CLIP checkpoints (SigLIP, remote code) load whole via AutoModel.
    """
    from transformers import AutoModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    cls = CLIPVisionModelWithProjection if tower == "vision" else CLIPTextModelWithProjection
    if config.model_type == "clip":
        sub = getattr(config, f"{tower}_config")
        sub.projection_dim = config.projection_dim
        return cls, sub
    if config.model_type == f"clip_{tower}_model":
        return cls, config
    return AutoModel, config


def build(enc: EncoderConfig) -> Encoder:
    import torch

    device = pick_device(enc)
    # Half precision only pays on CUDA; on CPU it is slow and some kernels are missing.
    dtype = torch_dtype(enc.dtype) if device == "cuda" else torch.float32
    config = _load_config(enc)

    if enc.kind == "clip_text":
        from transformers import AutoTokenizer

        cls, tower_config = _clip_tower(enc, config, "text")
        model = _load_model(cls, enc, dtype, config=tower_config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(enc.model, **_hub_kwargs(enc))
        except Exception as exc:  # noqa: BLE001
            raise _load_error(enc, exc) from exc
        text_config = getattr(config, "text_config", None) or config
        max_length = min(
            getattr(text_config, "max_position_embeddings", None) or 77,
            tokenizer.model_max_length or 77,
        )
        return ClipTextEncoder(enc, model, config, device, dtype, tokenizer, max_length)

    from transformers import AutoImageProcessor, AutoModel

    try:
        # The PIL backend is the reference both model families were trained with (torchvision
        # transforms on PIL images); the tensor backend resizes differently.
        processor = AutoImageProcessor.from_pretrained(enc.model, backend="pil", **_hub_kwargs(enc))
    except Exception as exc:  # noqa: BLE001
        raise _load_error(enc, exc) from exc
    if enc.kind == "clip_image":
        cls, tower_config = _clip_tower(enc, config, "vision")
        model = _load_model(cls, enc, dtype, config=tower_config)
        pooling = "get_image_features" if hasattr(model, "get_image_features") else "projected_cls"
        return ClipImageEncoder(enc, model, config, device, dtype, processor, pooling)
    if enc.kind == "dinov2":
        model = _load_model(AutoModel, enc, dtype, config=config)
        return Dinov2Encoder(enc, model, config, device, dtype, processor, "cls_after_layernorm")
    raise ValueError(f"encoder kind '{enc.kind}' is not model-backed")
