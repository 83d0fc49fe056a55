"""Local generation with transformers: a causal LM for instruct, an image-text-to-text model for
describe. Models load lazily on first use, so a step that only instructs never loads a vision model.

Requests are generated one at a time with a per-request seed: the same request gives the same
sample whatever batch it lands in. For throughput on a GPU, serve the model with vLLM and use the
`openai` backend instead.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from PIL import Image

from megapairs_ops.config import StepConfig
from megapairs_ops.stages.annotate.backends import (
    DEFAULT_MAX_PIXELS,
    Backend,
    DescribeRequest,
    ImageLoadError,
    InstructRequest,
    Result,
    completion_result,
    load_image,
)

log = logging.getLogger(__name__)

SIDE_BY_SIDE_NOTE = (
    "\n(The two images are shown side by side in one picture: the QUERY image on the left, "
    "the TARGET image on the right.)"
)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + right.width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def _to_model(inputs: Any, model: Any) -> dict[str, Any]:
    """Move inputs to the model's device; pixel tensors also take the model's dtype (bf16 on GPU)."""
    out = {}
    for key, value in dict(inputs).items():
        if hasattr(value, "to"):
            value = value.to(model.device, dtype=model.dtype) if value.is_floating_point() else value.to(model.device)
        out[key] = value
    return out


class TransformersBackend(Backend):
    kind = "transformers"

    def __init__(self, step: StepConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__()
        assert step.model
        self.step = step
        self.model_name = step.model
        self.max_pixels = max_pixels
        self._lm: tuple[Any, Any] | None = None
        self._vlm: tuple[Any, Any] | None = None
        # Cleared the first time the model rejects two images; it then gets one composite image.
        self._two_images = True

    # -- loading -----------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[str, Any]:
        import torch

        device = self.step.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
        return device, dtype

    def _load_kwargs(self) -> dict[str, Any]:
        return {"trust_remote_code": self.step.trust_remote_code}

    def _causal_lm(self) -> tuple[Any, Any]:
        if self._lm is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device, dtype = self._device_dtype()
            tokenizer = AutoTokenizer.from_pretrained(self.step.model, **self._load_kwargs())
            model = AutoModelForCausalLM.from_pretrained(
                self.step.model, dtype=dtype, use_safetensors=True, **self._load_kwargs()
            )
            self._lm = (tokenizer, model.to(device).eval())
        return self._lm

    def _vision_lm(self) -> tuple[Any, Any]:
        if self._vlm is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            device, dtype = self._device_dtype()
            processor = AutoProcessor.from_pretrained(self.step.model, **self._load_kwargs())
            model = AutoModelForImageTextToText.from_pretrained(
                self.step.model, dtype=dtype, use_safetensors=True, **self._load_kwargs()
            )
            self._vlm = (processor, model.to(device).eval())
        return self._vlm

    # -- generation --------------------------------------------------------------------------
    def _generate(self, model: Any, inputs: dict[str, Any], seed: int, pad_token_id: int | None) -> tuple[Any, str]:
        """The new tokens, and why generation ended: "stop" (end of sequence) or "length"
        (max_tokens reached first)."""
        import torch

        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"max_new_tokens": self.step.max_tokens, "pad_token_id": pad_token_id}
        if self.step.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.step.temperature, top_p=self.step.top_p)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        cut = len(new_tokens) >= self.step.max_tokens and int(new_tokens[-1]) not in eos_ids
        return new_tokens, "length" if cut else "stop"

    def instruct(self, requests: Sequence[InstructRequest]) -> list[Result]:
        self.count("instruct", len(requests))
        tokenizer, model = self._causal_lm()
        results = []
        for req in requests:
            try:
                if getattr(tokenizer, "chat_template", None):
                    text = tokenizer.apply_chat_template(
                        [{"role": "user", "content": req.prompt}], add_generation_prompt=True, tokenize=False
                    )
                    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
                else:
                    inputs = tokenizer(req.prompt, return_tensors="pt")
                inputs = _to_model(inputs, model)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                new_tokens, finish = self._generate(model, inputs, req.seed, pad)
                text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
                results.append(completion_result(
                    text, self.model_name, finish, self.step.max_tokens,
                    tokens_in=int(inputs["input_ids"].shape[1]), tokens_out=len(new_tokens),
                ))
            except Exception as exc:  # one bad generation must not sink the batch
                results.append(Result(None, self.model_name, "generation_error", f"{type(exc).__name__}: {exc}"))
        return results

    def describe(self, requests: Sequence[DescribeRequest]) -> list[Result]:
        self.count("describe", len(requests))
        processor, model = self._vision_lm()
        results = []
        for req in requests:
            try:
                images = [
                    load_image(ref, self.step.image_max_side, self.max_pixels) for ref in (req.q_image, req.t_image)
                ]
            except ImageLoadError as exc:
                results.append(Result(None, self.model_name, exc.reason, exc.detail, retryable=False))
                continue
            try:
                if self._two_images:
                    try:
                        result = self._describe_images(processor, model, images, req.prompt, req.seed)
                    except (ValueError, RuntimeError, IndexError) as exc:
                        # Single-image models fail on the second image; fall back to a composite.
                        log.warning("%s: two-image input failed (%s); using side-by-side images", self.model_name, exc)
                        self._two_images = False
                if not self._two_images:
                    result = self._describe_images(
                        processor, model, [side_by_side(*images)], req.prompt + SIDE_BY_SIDE_NOTE, req.seed
                    )
                results.append(result)
            except Exception as exc:
                results.append(Result(None, self.model_name, "generation_error", f"{type(exc).__name__}: {exc}"))
        return results

    def _describe_images(self, processor: Any, model: Any, images: list[Image.Image], prompt: str, seed: int) -> Result:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        if getattr(processor, "chat_template", None):
            text = processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        else:
            token = getattr(processor, "image_token", "<image>")
            text = token * len(images) + "\n" + prompt
        inputs = _to_model(processor(text=text, images=images, return_tensors="pt"), model)
        tokenizer = getattr(processor, "tokenizer", processor)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        new_tokens, finish = self._generate(model, inputs, seed, pad)
        text = processor.decode(new_tokens, skip_special_tokens=True).strip()
        return completion_result(
            text, self.model_name, finish, self.step.max_tokens,
            tokens_in=int(inputs["input_ids"].shape[1]), tokens_out=len(new_tokens),
        )
