"""One typed pipeline config, loaded from YAML once and validated before any work starts.

Every problem is reported as a single line naming the offending key and what to do about it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config problem, already formatted as one line: '<file>: <key>: <problem>'."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _looks_like_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


EncoderKind = Literal[
    "classic_color_layout",
    "classic_texture",
    "classic_text_hash",
    "clip_image",
    "clip_text",
    "dinov2",
    "open_clip_image",
    "open_clip_text",
    "precomputed",
]
ENCODER_KINDS = get_args(EncoderKind)
WEIGHT_FREE_KINDS = {"classic_color_layout", "classic_texture", "classic_text_hash"}
TEXT_KINDS = {"classic_text_hash", "clip_text", "open_clip_text"}
OPEN_CLIP_KINDS = {"open_clip_image", "open_clip_text"}
# Kinds whose `image_size` resizes the model input (position embeddings are interpolated).
SIZED_KINDS = {"clip_image", "dinov2", "open_clip_image"}


class PrecomputedSource(_Strict):
    """Vectors computed elsewhere: clip-retrieval's output folder, or one .npy plus an ids file."""

    # A clip-retrieval output folder (img_emb/, text_emb/, metadata/) or a .npy file of (n, dim).
    path: str
    # With a .npy file: Parquet (column `column`) or .txt (one key per line), row i <-> vector i.
    ids: str | None = None
    # Which clip-retrieval vectors to read: img_emb (image) or text_emb (caption).
    embeddings: Literal["image", "text"] = "image"
    # How a row finds its image in images.parquet: by file path (also matching collapsed
    # duplicate paths), by img2dataset/WebDataset key (file or tar member name without extension),
    # or by this pipeline's image_id / sha256.
    match_on: Literal["path", "key", "image_id", "sha256"] = "path"
    # The column holding the match key; default: image_path (clip-retrieval) for path/key, else match_on.
    column: str | None = None
    # Relative paths in the metadata are taken relative to this folder (clip-retrieval writes them
    # as given on its command line).
    path_root: str | None = None

    @property
    def key_column(self) -> str:
        return self.column or ("image_path" if self.match_on in ("path", "key") else self.match_on)

    @model_validator(mode="after")
    def _source_exists(self) -> "PrecomputedSource":
        root = Path(self.path).expanduser()
        if root.is_file():
            if root.suffix != ".npy":
                raise ValueError(f"precomputed path '{self.path}' must be a .npy file or a clip-retrieval folder")
            if not self.ids:
                raise ValueError("a precomputed .npy needs 'ids' (a Parquet or .txt file, one key per vector row)")
            if not Path(self.ids).expanduser().is_file():
                raise ValueError(f"precomputed ids file '{self.ids}' not found")
            if Path(self.ids).suffix not in (".parquet", ".txt"):
                raise ValueError(f"precomputed ids file '{self.ids}' must be .parquet or .txt")
            return self
        folder = "img_emb" if self.embeddings == "image" else "text_emb"
        if not (root / folder).is_dir() or not (root / "metadata").is_dir():
            raise ValueError(
                f"precomputed path '{self.path}' is neither a .npy file nor a clip-retrieval folder "
                f"with {folder}/ and metadata/"
            )
        if self.ids:
            raise ValueError("'ids' is only for a plain .npy; clip-retrieval folders carry metadata/")
        return self


class EncoderConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")]
    kind: EncoderKind
    model: str | None = None
    revision: str | None = None
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64
    band: tuple[float, float] = (0.8, 0.96)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    # Only for classic kinds: the vector size; ignored by model-backed kinds. For `precomputed`,
    # when given, the vectors must have this size.
    dim: Annotated[int, Field(ge=8, le=65536)] = 512
    # open_clip kinds: a pretrained tag of the architecture named by `model` (e.g.
    # 'merged2b_s4b_b131k') or a weights file; unused with 'hf-hub:' / 'local-dir:' models.
    pretrained: str | None = None
    # Model input side in pixels; None keeps the checkpoint's own (224 for CLIP/DINOv2).
    image_size: Annotated[int, Field(ge=16, le=4096)] | None = None
    precomputed: PrecomputedSource | None = None

    @field_validator("band")
    @classmethod
    def _band_ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        lo, hi = band
        if not (-1.0 <= lo < hi <= 1.0):
            raise ValueError(f"band must be [lo, hi] with -1 <= lo < hi <= 1, got [{lo}, {hi}]")
        return band

    @model_validator(mode="after")
    def _model_present(self) -> "EncoderConfig":
        if self.image_size is not None and self.kind not in SIZED_KINDS:
            raise ValueError(f"image_size applies to kinds {sorted(SIZED_KINDS)}, not '{self.kind}'")
        if self.pretrained is not None and self.kind not in OPEN_CLIP_KINDS:
            raise ValueError(f"'pretrained' is only for open_clip kinds, not '{self.kind}'")
        if (self.kind == "precomputed") != (self.precomputed is not None):
            raise ValueError("kind 'precomputed' needs a 'precomputed' section, and only that kind takes one")
        if self.kind in WEIGHT_FREE_KINDS:
            return self
        if self.kind == "precomputed":
            if self.model:
                raise ValueError("kind 'precomputed' takes no 'model'; its vectors come from 'precomputed.path'")
            return self
        if not self.model:
            raise ValueError(
                f"encoder kind '{self.kind}' needs 'model' (a hub id or a local directory)"
            )
        if self.kind in OPEN_CLIP_KINDS:
            return self._open_clip_model_present()
        if _looks_like_local_path(self.model):
            path = Path(self.model).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"model path '{self.model}' has no config.json; point 'model' at a directory "
                    "written by save_pretrained()"
                )
        return self

    def _open_clip_model_present(self) -> "EncoderConfig":
        model = self.model or ""
        if model.startswith("local-dir:") or _looks_like_local_path(model):
            folder = Path(model.removeprefix("local-dir:")).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise ValueError(
                    f"open_clip model folder '{folder}' has no open_clip_config.json; give an architecture "
                    "name (e.g. EVA02-L-14) with 'pretrained', 'hf-hub:org/repo' or a local-dir: folder"
                )
        elif self.pretrained and _looks_like_local_path(self.pretrained):
            if not Path(self.pretrained).expanduser().is_file():
                raise ValueError(f"pretrained weights file '{self.pretrained}' not found")
        return self

    @property
    def modality(self) -> Literal["image", "text"]:
        if self.precomputed is not None:
            return self.precomputed.embeddings
        return "text" if self.kind in TEXT_KINDS else "image"


class EmbedConfig(_Strict):
    """How the embed stage runs. Nothing here changes a vector, so none of it is in the stage's
    fingerprint: changing it re-plans the work, never invalidates finished embeddings."""

    # Images per resumable shard (images.parquet order); a killed task loses at most one shard.
    shard_size: Annotated[int, Field(ge=1, le=10_000_000)] = 16_384
    # Shards per work item (one mapped Airflow task).
    shards_per_task: Annotated[int, Field(ge=1)] = 8
    # Decode + preprocess processes feeding the model: "auto" = one per spare core on CUDA (up to
    # 16); on CPU, where the model already uses every core, decode runs in-process between batches.
    decode_workers: int | Literal["auto"] = "auto"
    # Decoded batches queued per worker ahead of the model.
    prefetch_batches: Annotated[int, Field(ge=1, le=64)] = 2
    # Image encoders of one resource class share a task and decode each image once.
    share_decode: bool = True
    # Content-addressed embedding cache (image sha256 / caption hash x encoder identity).
    cache: bool = True
    # Where the cache lives; default: .cache/embeddings beside the run directories, so every run
    # under one output root shares it. A relative path is taken from that output root.
    cache_dir: str | None = None
    # DuckDB memory budget for cache lookups and precomputed-vector matching.
    memory_limit: str = "2GB"

    @field_validator("decode_workers")
    @classmethod
    def _workers_count(cls, value: int | str) -> int | str:
        if value != "auto" and not 0 <= value <= 256:
            raise ValueError(f"decode_workers must be 'auto' or 0..256 (0: decode in the task's process), got {value}")
        return value


class ManifestColumns(_Strict):
    path: str = "path"
    caption: str = "caption"


class IngestConfig(_Strict):
    reader: Literal["auto", "folder", "manifest", "webdataset"] = "auto"
    columns: ManifestColumns = ManifestColumns()
    # Manifest rows may only point inside these roots; empty means "the manifest's own folder".
    allowed_roots: list[str] = []
    max_pixels: Annotated[int, Field(ge=1)] = 100_000_000
    max_file_bytes: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024
    min_side: Annotated[int, Field(ge=1)] = 8
    max_caption_chars: Annotated[int, Field(ge=1)] = 4000


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int) -> int:
    """'8GB' (decimal, as DuckDB reads it), '8GiB' (binary) or a plain byte count -> bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if unit not in _BYTE_UNITS:
        raise ValueError(f"'{value}' is not a memory size; write e.g. 8GB, 512MiB or a byte count")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def _memory_size(value: str | int) -> str | int:
    if parse_bytes(value) <= 0:
        raise ValueError(f"memory size must be positive, got '{value}'")
    return value


MemorySize = Annotated[str | int, AfterValidator(_memory_size)]


class MiningConfig(_Strict):
    """k-NN mining; how the index is chosen from these keys is documented in docs/mining.md."""

    k: Annotated[int, Field(ge=1, le=4096)] = 20
    max_targets_per_query: Annotated[int, Field(ge=1)] = 5
    n_hard_negatives: Annotated[int, Field(ge=0, le=64)] = 5
    query_batch_size: Annotated[int, Field(ge=1)] = 4096
    index: Literal["auto", "flat", "ivf_flat", "ivf_pq"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Host memory the search may hold (index shard, running top-k, ids, one query batch).
    memory_budget: MemorySize = "4GB"
    # `index: auto` stays exact up to this many vectors, then goes approximate.
    exact_max_vectors: Annotated[int, Field(ge=2)] = 1_000_000
    recall_target: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    nlist: Annotated[int, Field(ge=1)] | None = None
    nprobe: Annotated[int, Field(ge=1)] | None = None
    train_size: Annotated[int, Field(ge=1)] | None = None
    pq_m: Annotated[int, Field(ge=1)] | None = None
    # IVF-PQ fetches rerank_factor x (k + 1) codes-ranked neighbours and re-ranks them exactly.
    rerank_factor: Annotated[int, Field(ge=1, le=64)] = 4
    # Queries with exact ground truth used to pick nprobe and to measure recall (0: no calibration).
    calibration_queries: Annotated[int, Field(ge=0)] = 1000
    # Exact search: database rows per index shard; None derives it from memory_budget.
    shard_rows: Annotated[int, Field(ge=1)] | None = None
    # Query rows per work item (one Airflow task each when the lead maps over them).
    queries_per_task: Annotated[int, Field(ge=1)] = 2_000_000
    gpus: Annotated[int, Field(ge=1)] | None = None
    gpu_float16: bool = False
    # Reuse the exact neighbours of a published version under the same output root: only new
    # images are searched against the whole corpus, old queries only against the new images
    # (docs/mining.md).
    incremental: bool = True

    @model_validator(mode="after")
    def _k_covers_negatives(self) -> "MiningConfig":
        if self.k < self.max_targets_per_query:
            raise ValueError(
                f"k ({self.k}) must be >= max_targets_per_query ({self.max_targets_per_query})"
            )
        if self.nlist and self.nprobe and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must be <= nlist ({self.nlist})")
        return self


class PairsConfig(_Strict):
    max_pairs_per_query: Annotated[int, Field(ge=1)] = 5
    # Two images whose 64-bit perceptual hashes differ in at most this many bits are the same picture.
    near_duplicate_hamming: Annotated[int, Field(ge=0, le=64)] = 6
    # DuckDB's buffer limit; it spills to temp_directory beyond it (process peak is a little above).
    memory_limit: MemorySize = "2GB"
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    # Spill folder (relative: inside the run directory); None means <run dir>/tmp/pairs, emptied
    # when the stage starts.
    temp_directory: str | None = None


class VLLMEngineConfig(_Strict):
    """Settings of an in-process vllm.LLM engine (backend 'vllm')."""

    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    dtype: Literal["auto", "float16", "bfloat16"] = "auto"
    max_model_len: Annotated[int, Field(ge=256)] | None = None
    max_num_seqs: Annotated[int, Field(ge=1)] | None = None
    # InternVL-style dynamic tiling: at most this many 448px tiles per image (vLLM's
    # mm_processor_kwargs.max_dynamic_patch); None keeps the model's own default.
    max_image_tiles: Annotated[int, Field(ge=1, le=40)] | None = None
    mm_processor_kwargs: dict[str, Any] = {}
    enforce_eager: bool = False


class StepConfig(_Strict):
    backend: Literal["template", "openai", "transformers", "vllm"] = "template"
    model: str | None = None
    base_url: str | None = None
    # Where the API key comes from: an Airflow connection (password; its host also supplies the
    # endpoint when base_url is empty), else this environment variable. Never the key itself.
    connection_id: str | None = None
    api_key_env: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 512
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    stop: list[str] = []
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    http_attempts: Annotated[int, Field(ge=1, le=20)] = 4
    backoff_s: Annotated[float, Field(ge=0)] = 1.0
    max_backoff_s: Annotated[float, Field(ge=0)] = 60.0
    breaker_failures: Annotated[int, Field(ge=1)] = 5
    breaker_cooldown_s: Annotated[float, Field(gt=0)] = 2.0
    outage_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    structured_output: bool = False
    image_max_side: Annotated[int, Field(ge=32)] = 512
    image_transport: Literal["data_url", "file"] = "data_url"
    image_cache_dir: str | None = None
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
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
        if self.backend == "transformers" and self.model and _looks_like_local_path(self.model):
            if not (Path(self.model).expanduser() / "config.json").is_file():
                raise ValueError(f"model path '{self.model}' has no config.json")
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


class OutputChecksConfig(_Strict):
    """What a model answer must look like to be accepted as written (annotation/checks.py).
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


class AnnotateConfig(_Strict):
    # A folder of megapairs_ops/prompts/ (describe.txt, instruct.txt, demos.jsonl).
    prompt_version: str = "v1"
    word_num: tuple[int, int] = (60, 100)
    n_demos: Annotated[int, Field(ge=0, le=50)] = 5
    min_instructions: Annotated[int, Field(ge=1)] = 3
    # Output checks: a description may miss WORD_NUM by this fraction; instructions are bounded.
    word_num_tolerance: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    max_instruction_chars: Annotated[int, Field(ge=20)] = 300
    # Tries per pair and step in one run, and in all runs together (a re-run retries failures).
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    max_attempts_across_runs: Annotated[int, Field(ge=1, le=200)] = 9
    # Pairs in flight at once (the batch a local model gets; HTTP backends keep their
    # concurrency saturated from it).
    batch_size: Annotated[int, Field(ge=1)] = 256
    # Results are committed in small parts every this many records or seconds, whichever first.
    checkpoint_every: Annotated[int, Field(ge=1)] = 256
    checkpoint_interval_s: Annotated[float, Field(gt=0)] = 10.0
    # Size of one mapped Airflow work item.
    pairs_per_task: Annotated[int, Field(ge=1)] = 50_000
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


class PublishConfig(_Strict):
    part_rows: Annotated[int, Field(ge=1)] = 50_000
    jsonl: bool = True
    # DuckDB catalogue of published pairs and versions; default: catalogue.duckdb beside the run dirs.
    catalogue: str | None = None


class ValidationConfig(_Strict):
    enabled: bool = True


Severity = Literal["warn", "fail"]


class MaxGate(_Strict):
    """A figure that must stay at or below `max`; null `max` turns the gate off."""

    max: float | None
    severity: Severity = "fail"


class MinGate(_Strict):
    """A figure that must stay at or above `min`; null `min` turns the gate off."""

    min: float | None
    severity: Severity = "fail"


class GatesConfig(_Strict):
    """Data-quality gates beyond schema (megapairs_ops.validate). `fail` fails the stage, so
    nothing downstream runs and nothing publishes; `warn` is reported in the validation result,
    stats.json and the curator report. A gate may be given as a mapping (a partial one keeps the
    default for the rest), as a bare threshold, or as null (off)."""

    # Share-type figures of fewer rows than this say nothing yet: those gates are skipped.
    min_rows: Annotated[int, Field(ge=1)] = 50
    # ingest: inputs quarantined, and inputs that were byte-identical copies of another input
    quarantine_rate: MaxGate = MaxGate(max=0.3, severity="fail")
    duplicate_rate: MaxGate = MaxGate(max=0.2, severity="warn")
    # pairs: every encoder finds at least this share of the pairs (a silent encoder finds none)
    encoder_share: MinGate = MinGate(min=0.02, severity="warn")
    # publish: annotation failures among annotated pairs, instructions per triplet, and template
    # collapse: the share of triplets holding the most common instruction, the share of
    # instructions opening with the most common three words, distinct bigrams over all bigrams
    failure_rate: MaxGate = MaxGate(max=0.2, severity="fail")
    mean_instructions: MinGate = MinGate(min=3.0, severity="warn")
    instruction_share: MaxGate = MaxGate(max=0.2, severity="fail")
    opening_share: MaxGate = MaxGate(max=0.5, severity="warn")
    distinct_2gram_ratio: MinGate = MinGate(min=0.05, severity="warn")

    @model_validator(mode="before")
    @classmethod
    def _fill_partial_gates(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            default = field.default
            if name not in data or not isinstance(default, (MaxGate, MinGate)):
                continue
            bound = "max" if isinstance(default, MaxGate) else "min"
            value = data[name]
            if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
                value = {bound: value}
            if isinstance(value, dict):
                data[name] = {**default.model_dump(), **value}
        return data

    @field_validator(
        "quarantine_rate", "duplicate_rate", "encoder_share", "failure_rate",
        "instruction_share", "opening_share", "distinct_2gram_ratio",
    )
    @classmethod
    def _rate_in_unit_interval(cls, gate: MaxGate | MinGate) -> MaxGate | MinGate:
        bound = gate.max if isinstance(gate, MaxGate) else gate.min
        if bound is not None and not 0.0 <= bound <= 1.0:
            raise ValueError(f"threshold must be a share between 0 and 1, got {bound}")
        return gate


class CurationConfig(_Strict):
    """What curators decide (megapairs_ops.curation) and what the curator report compares with."""

    # CSV with columns kind (pair | image), id (a pair_id, or an image_id / sha256), reason.
    # Read at publish: listed pairs, and pairs whose query or target is a listed image, are
    # withheld; a relative path is taken from the working directory.
    rejects_file: str | None = None
    # A listed image that is a hard negative is replaced by another eligible negative from the
    # query's retrieved set ("replace"), or its pair is withheld ("drop").
    rejected_negatives: Literal["replace", "drop"] = "replace"
    # Report gallery: triplets sampled (seeded) per encoder that found them.
    gallery_per_encoder: Annotated[int, Field(ge=0, le=200)] = 4
    # The run the report compares with: "auto" (the latest other complete run in the same output
    # folder), a run directory, or null (no comparison).
    compare_with: str | None = "auto"

    @field_validator("rejects_file")
    @classmethod
    def _rejects_file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(
                f"file '{value}' not found; create it (CSV header: kind,id,reason) or set null"
            )
        return value


class ResourcesConfig(_Strict):
    """Where Airflow should run each kind of task (queues and pools of a deployment)."""

    gpu_queue: str = "gpu"
    gpu_pool: str = "gpu"
    llm_pool: str = "llm"
    # Slots of the pools that `megapairs airflow-pools` creates: GPU tasks in parallel, and annotation
    # tasks sharing the inference servers.
    gpu_pool_slots: Annotated[int, Field(ge=1)] = 1
    llm_pool_slots: Annotated[int, Field(ge=1)] = 4


class PipelineConfig(_Strict):
    seed: int = 0
    ingest: IngestConfig = IngestConfig()
    encoders: Annotated[list[EncoderConfig], Field(min_length=1)]
    embed: EmbedConfig = EmbedConfig()
    mining: MiningConfig = MiningConfig()
    pairs: PairsConfig = PairsConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    publish: PublishConfig = PublishConfig()
    validation: ValidationConfig = ValidationConfig()
    gates: GatesConfig = GatesConfig()
    curation: CurationConfig = CurationConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @field_validator("encoders")
    @classmethod
    def _unique_names(cls, encoders: list[EncoderConfig]) -> list[EncoderConfig]:
        names = [e.name for e in encoders]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"encoder names must be unique; repeated: {', '.join(dup)}")
        return encoders

    def encoder(self, name: str) -> EncoderConfig:
        for enc in self.encoders:
            if enc.name == name:
                return enc
        raise KeyError(f"no encoder named '{name}' in config (have: {[e.name for e in self.encoders]})")

    def section_fingerprint(self, *parts: Any) -> str:
        """A stable hash of config sections, used to decide whether a finished stage is still valid."""
        payload = json.dumps(
            [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling"
    elif kind == "missing":
        msg = "required key is missing; add it"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_config(data: Any, source: str = "<config>") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a YAML config; `overrides` is a nested mapping merged on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; pass --config with an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if overrides:
        data = _deep_merge(data, overrides)
    return parse_config(data, str(path))


def _deep_merge(base: Any, over: dict[str, Any]) -> Any:
    if not isinstance(base, dict):
        return over
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out.get(key), value) if isinstance(value, dict) else value
    return out
