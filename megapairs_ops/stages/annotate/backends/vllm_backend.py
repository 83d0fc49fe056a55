"""In-process vLLM (`vllm.LLM`) for batch jobs on a GPU worker.

The engine is created on first use, so importing this module (or building the backend) loads
no vLLM. `LLM.chat` applies the model's own chat template and places the image tokens; images
go in as PIL images (already decoded and resized here), so nothing is base64-encoded. The
describe engine allows two images per prompt (`limit_mm_per_prompt`) and caps InternVL's dynamic
tiling (`mm_processor_kwargs.max_dynamic_patch`) so two 512px images stay within a small token
budget. Sampling parameters come from the StepConfig, with the per-request seed; structured
output uses vLLM's StructuredOutputsParams (GuidedDecodingParams before vLLM 0.12).

The request-building functions (`engine_kwargs`, `sampling_kwargs`, `describe_messages`,
`instruct_messages`) are plain data and are tested without vLLM; the engine calls themselves
need a GPU and vLLM (requirements-gpu.txt).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Sequence

from PIL import Image

from megapairs_ops.config import StepConfig
from megapairs_ops.stages.annotate.backends import (
    DEFAULT_MAX_PIXELS,
    Backend,
    BackendError,
    DescribeRequest,
    ImageLoadError,
    InstructRequest,
    Result,
    completion_result,
    load_image,
)
from megapairs_ops.stages.annotate.parsing import instructions_schema

log = logging.getLogger(__name__)

IMAGES_PER_PROMPT = 2  # query and target


def engine_kwargs(step: StepConfig, multimodal: bool) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM(...)."""
    v = step.vllm
    kwargs: dict[str, Any] = {
        "model": step.model,
        "trust_remote_code": step.trust_remote_code,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "dtype": v.dtype,
        "enforce_eager": v.enforce_eager,
    }
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    if v.max_num_seqs is not None:
        kwargs["max_num_seqs"] = v.max_num_seqs
    if multimodal:
        kwargs["limit_mm_per_prompt"] = {"image": IMAGES_PER_PROMPT}
        mm = dict(v.mm_processor_kwargs)
        if v.max_image_tiles is not None:
            mm["max_dynamic_patch"] = v.max_image_tiles
        if mm:
            kwargs["mm_processor_kwargs"] = mm
    return kwargs


def sampling_kwargs(step: StepConfig, seed: int) -> dict[str, Any]:
    """Keyword arguments for vllm.SamplingParams(...), structured output aside."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": step.temperature,
        "top_p": step.top_p,
        "max_tokens": step.max_tokens,
        "seed": seed,
    }
    if step.stop:
        kwargs["stop"] = list(step.stop)
    return kwargs


def describe_messages(images: Sequence[Image.Image], prompt: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image_pil", "image_pil": img} for img in images]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def instruct_messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def _structured_params(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(json=schema)}
    except ImportError:  # vLLM < 0.12
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}


class VLLMBackend(Backend):
    kind = "vllm"

    def __init__(self, step: StepConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__()
        assert step.model
        if importlib.util.find_spec("vllm") is None:
            raise BackendError(
                "annotate backend 'vllm' needs vLLM on this worker: pip install -r requirements-gpu.txt "
                "(GPU workers), or use backend 'openai' against `vllm serve`"
            )
        self.step = step
        self.model_name = step.model
        self.structured = step.structured_output
        self.max_pixels = max_pixels
        self._llm: Any = None
        self._multimodal = False

    def _engine(self, multimodal: bool) -> Any:
        if self._llm is None or (multimodal and not self._multimodal):
            from vllm import LLM

            log.info("vllm: loading %s (multimodal=%s)", self.model_name, multimodal)
            self._llm = LLM(**engine_kwargs(self.step, multimodal))
            self._multimodal = multimodal
        return self._llm

    def _sampling(self, seed: int, schema: dict[str, Any] | None) -> Any:
        from vllm import SamplingParams

        extra = _structured_params(schema) if schema is not None else {}
        return SamplingParams(**sampling_kwargs(self.step, seed), **extra)

    def _generate(self, multimodal: bool, conversations: list[list[dict]], params: list[Any]) -> list[Result]:
        if not conversations:
            return []
        llm = self._engine(multimodal)
        try:
            outputs = llm.chat(conversations, sampling_params=params, use_tqdm=False)
        except (ValueError, TypeError, RuntimeError) as exc:
            if len(conversations) == 1:
                return [Result(None, self.model_name, "generation_error", f"{type(exc).__name__}: {exc}")]
            # One prompt (too long, malformed image) must not sink its whole batch: isolate it.
            log.warning("vllm: batch of %d failed (%s); retrying one by one", len(conversations), exc)
            return [r for c, p in zip(conversations, params) for r in self._generate(multimodal, [c], [p])]
        results = []
        for out in outputs:
            completion = out.outputs[0] if out.outputs else None
            if completion is None:
                results.append(Result(None, self.model_name, "bad_response", "no completion"))
                continue
            results.append(
                completion_result(
                    completion.text,
                    self.model_name,
                    getattr(completion, "finish_reason", None),
                    self.step.max_tokens,
                    tokens_in=len(out.prompt_token_ids or ()),
                    tokens_out=len(completion.token_ids or ()),
                )
            )
        return results

    def describe(self, requests: Sequence[DescribeRequest]) -> list[Result]:
        self.count("describe", len(requests))
        results: list[Result | None] = [None] * len(requests)
        conversations, params, slots = [], [], []
        for i, req in enumerate(requests):
            try:
                images = [load_image(ref, self.step.image_max_side, self.max_pixels) for ref in (req.q_image, req.t_image)]
            except ImageLoadError as exc:
                results[i] = Result(None, self.model_name, exc.reason, exc.detail, retryable=False)
                continue
            conversations.append(describe_messages(images, req.prompt))
            params.append(self._sampling(req.seed, None))
            slots.append(i)
        for i, result in zip(slots, self._generate(True, conversations, params)):
            results[i] = result
        return [r for r in results if r is not None]

    def instruct(self, requests: Sequence[InstructRequest]) -> list[Result]:
        self.count("instruct", len(requests))
        conversations = [instruct_messages(req.prompt) for req in requests]
        params = [
            self._sampling(req.seed, instructions_schema(req.min_instructions, req.max_chars) if self.structured else None)
            for req in requests
        ]
        return self._generate(self._multimodal, conversations, params)
