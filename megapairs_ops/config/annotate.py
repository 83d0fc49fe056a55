"""Config of the annotate stage: the describe and instruct steps, the prompt set and draws, and
the checks an answer must pass (stages/annotate/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import RUNTIME, Strict


class VLLMEngineConfig(Strict):
    """Settings of an in-process vllm.LLM engine (backend 'vllm')."""

    tensor_parallel_size: Annotated[int, Field(ge=1, le=64), RUNTIME] = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0), RUNTIME] = 0.9
    dtype: Literal["auto", "float16", "bfloat16"] = "auto"
    max_model_len: Annotated[int, Field(ge=256)] | None = None
    max_num_seqs: Annotated[int | None, Field(ge=1), RUNTIME] = None
    # InternVL-style dynamic tiling: at most this many 448px tiles per image (vLLM's
    # mm_processor_kwargs.max_dynamic_patch); None keeps the model's own default.
    max_image_tiles: Annotated[int, Field(ge=1, le=40)] | None = None
    mm_processor_kwargs: dict[str, Any] = {}
    enforce_eager: Annotated[bool, RUNTIME] = False


class StepConfig(Strict):
    """One annotation step (describe or instruct): which model answers, how it samples, and the
    runtime knobs of reaching it (endpoint, key, timeouts, concurrency, retries)."""

    backend: Literal["template", "openai", "transformers", "vllm"] = "template"
    model: str | None = None
    base_url: Annotated[str | None, RUNTIME] = None
    # Where the API key comes from: an Airflow connection (password; its host also supplies the
    # endpoint when base_url is empty), else this environment variable. Never the key itself.
    connection_id: Annotated[str | None, RUNTIME] = None
    api_key_env: Annotated[str | None, RUNTIME] = None
    max_tokens: Annotated[int, Field(ge=1)] = 512
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    stop: list[str] = []
    timeout_s: Annotated[float, Field(gt=0), RUNTIME] = 120.0
    concurrency: Annotated[int, Field(ge=1, le=1024), RUNTIME] = 8
    http_attempts: Annotated[int, Field(ge=1, le=20), RUNTIME] = 4
    backoff_s: Annotated[float, Field(ge=0), RUNTIME] = 1.0
    max_backoff_s: Annotated[float, Field(ge=0), RUNTIME] = 60.0
    breaker_failures: Annotated[int, Field(ge=1), RUNTIME] = 5
    breaker_cooldown_s: Annotated[float, Field(gt=0), RUNTIME] = 2.0
    outage_timeout_s: Annotated[float, Field(gt=0), RUNTIME] = 1800.0
    structured_output: bool = False
    image_max_side: Annotated[int, Field(ge=32)] = 512
    image_transport: Annotated[Literal["data_url", "file"], RUNTIME] = "data_url"
    image_cache_dir: Annotated[str | None, RUNTIME] = None
    trust_remote_code: bool = False
    device: Annotated[Literal["auto", "cpu", "cuda"], RUNTIME] = "auto"
    vllm: VLLMEngineConfig = VLLMEngineConfig()

    @model_validator(mode="after")
    def _backend_needs(self) -> "StepConfig":
        if self.backend in ("openai", "transformers", "vllm") and not self.model:
            raise ValueError(f"backend '{self.backend}' needs 'model'")
        if self.backend == "openai" and not (self.base_url or self.connection_id):
            raise ValueError(
                "backend 'openai' needs 'base_url' (e.g. http://host:8000/v1) or 'connection_id'"
            )
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got '{self.base_url}'")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) must be >= backoff_s ({self.backoff_s})")
        return self


# Chat-template and special tokens, per model family. A model that did not stop where its turn
# ended writes them into its answer (often with debris after them): such an answer is rejected as
# `template_token`, whatever family the configured model is, since any of them is debris in text.
DEFAULT_TEMPLATE_TOKENS: dict[str, list[str]] = {
    # ChatML: Qwen, InternLM2 (InternVL2's language model), Yi
    "chatml": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"],
    "llama2_mistral": ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"],
    "phi": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    # Image placeholders of multimodal prompts: InternVL, LLaVA, Qwen-VL
    "image_slots": ["<image>", "<img>", "</img>", "<IMG_CONTEXT>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"],
    "sentencepiece": ["<unk>", "<pad>"],
}
# Prompt meta-language: a retrieval instruction speaks about the wanted image, never about the
# prompt's image slots or the description it was written from (matched as whole words, any case).
DEFAULT_META_PHRASES: list[str] = [
    "image 1", "image 2", "image one", "image two", "picture 1", "picture 2", "photo 1", "photo 2",
    "first image", "second image", "first picture", "second picture", "first photo", "second photo",
    "query image", "target image", "query picture", "target picture", "query photo", "target photo",
    "the description", "the given description",
]


class OutputChecksConfig(Strict):
    """What a model answer must look like to be accepted as written (stages/annotate/checks.py).
    Answers that fail are re-sampled, and a pair whose answers keep failing lands in
    failures.parquet with the reason; it is never published."""

    # Family -> tokens; any token of any family, and any token shaped <|...|>, rejects an answer.
    template_tokens: dict[str, list[str]] = DEFAULT_TEMPLATE_TOKENS
    # Phrases an instruction must not contain (descriptions may name the query and target images).
    meta_phrases: list[str] = DEFAULT_META_PHRASES
    # Descriptions and every instruction end as a sentence: . ! or ? (closing quotes allowed).
    require_sentence_end: bool = True

    @field_validator("template_tokens")
    @classmethod
    def _tokens_not_blank(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for family, tokens in value.items():
            if any(not t.strip() for t in tokens):
                raise ValueError(f"family '{family}' has a blank token; remove it")
        return value

    @field_validator("meta_phrases")
    @classmethod
    def _phrases_not_blank(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("a meta phrase is blank; remove it")
        return value


class AnnotateConfig(Strict):
    # A folder of megapairs_ops/prompts/ (describe.txt, instruct.txt, demos.jsonl).
    prompt_version: str = "v1"
    word_num: tuple[int, int] = (60, 100)
    n_demos: Annotated[int, Field(ge=0, le=50)] = 5
    min_instructions: Annotated[int, Field(ge=1)] = 3
    # Output checks: a description may miss WORD_NUM by this fraction; instructions are bounded.
    word_num_tolerance: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    max_instruction_chars: Annotated[int, Field(ge=20)] = 300
    # Tries per pair and step in one run, and in all runs together (a re-run of a finished run
    # retries failures until each has had this many).
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    max_attempts_across_runs: Annotated[int, Field(ge=1, le=200)] = 9
    # Pairs in flight at once (the batch a local model gets; HTTP backends keep their
    # concurrency saturated from it).
    batch_size: Annotated[int, Field(ge=1), RUNTIME] = 256
    # Results are committed in small parts every this many records or seconds, whichever first.
    checkpoint_every: Annotated[int, Field(ge=1), RUNTIME] = 256
    checkpoint_interval_s: Annotated[float, Field(gt=0), RUNTIME] = 10.0
    # Pairs per work item (one mapped Airflow task).
    pairs_per_task: Annotated[int, Field(ge=1), RUNTIME] = 50_000
    describe: StepConfig = StepConfig()
    instruct: StepConfig = StepConfig()
    checks: OutputChecksConfig = OutputChecksConfig()

    @field_validator("prompt_version")
    @classmethod
    def _prompt_set_exists(cls, version: str) -> str:
        # Prompt sets ship inside the package, so every worker can check this one up front.
        from megapairs_ops.stages.annotate.prompts import PromptError, load_prompt_set

        try:
            load_prompt_set(version)
        except PromptError as exc:
            raise ValueError(f"{exc}; add that folder or name one that exists") from None
        return version

    @field_validator("word_num")
    @classmethod
    def _word_num_ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not (1 <= lo <= hi):
            raise ValueError(f"word_num must be [lo, hi] with 1 <= lo <= hi, got [{lo}, {hi}]")
        return value

    @model_validator(mode="after")
    def _attempt_budgets(self) -> "AnnotateConfig":
        if self.max_attempts_across_runs < self.max_attempts:
            raise ValueError(
                f"max_attempts_across_runs ({self.max_attempts_across_runs}) must be >= "
                f"max_attempts ({self.max_attempts})"
            )
        return self


__all__ = ["AnnotateConfig", "DEFAULT_META_PHRASES", "DEFAULT_TEMPLATE_TOKENS", "OutputChecksConfig", "StepConfig",
           "VLLMEngineConfig"]
