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
]
ENCODER_KINDS = get_args(EncoderKind)
WEIGHT_FREE_KINDS = {"classic_color_layout", "classic_texture", "classic_text_hash"}
TEXT_KINDS = {"classic_text_hash", "clip_text"}


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
    # Only for classic kinds: the vector size; ignored by model-backed kinds.
    dim: Annotated[int, Field(ge=8, le=65536)] = 512

    @field_validator("band")
    @classmethod
    def _band_ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        lo, hi = band
        if not (-1.0 <= lo < hi <= 1.0):
            raise ValueError(f"band must be [lo, hi] with -1 <= lo < hi <= 1, got [{lo}, {hi}]")
        return band

    @model_validator(mode="after")
    def _model_present(self) -> "EncoderConfig":
        if self.kind in WEIGHT_FREE_KINDS:
            return self
        if not self.model:
            raise ValueError(
                f"encoder kind '{self.kind}' needs 'model' (a hub id or a local directory)"
            )
        if _looks_like_local_path(self.model):
            path = Path(self.model).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"model path '{self.model}' has no config.json; point 'model' at a directory "
                    "written by save_pretrained()"
                )
        return self

    @property
    def modality(self) -> Literal["image", "text"]:
        return "text" if self.kind in TEXT_KINDS else "image"


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


class MiningConfig(_Strict):
    k: Annotated[int, Field(ge=1, le=4096)] = 20
    max_targets_per_query: Annotated[int, Field(ge=1)] = 5
    n_hard_negatives: Annotated[int, Field(ge=0, le=64)] = 5
    query_batch_size: Annotated[int, Field(ge=1)] = 4096

    @model_validator(mode="after")
    def _k_covers_negatives(self) -> "MiningConfig":
        if self.k < self.max_targets_per_query:
            raise ValueError(
                f"k ({self.k}) must be >= max_targets_per_query ({self.max_targets_per_query})"
            )
        return self


class PairsConfig(_Strict):
    max_pairs_per_query: Annotated[int, Field(ge=1)] = 5
    # Two images whose 64-bit perceptual hashes differ in at most this many bits are the same picture.
    near_duplicate_hamming: Annotated[int, Field(ge=0, le=64)] = 6
    memory_limit: str = "2GB"


class StepConfig(_Strict):
    backend: Literal["template", "openai", "transformers"] = "template"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 512
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    image_max_side: Annotated[int, Field(ge=32)] = 512
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _backend_needs(self) -> "StepConfig":
        if self.backend in ("openai", "transformers") and not self.model:
            raise ValueError(f"backend '{self.backend}' needs 'model'")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs 'base_url' (e.g. http://host:8000/v1)")
        if self.backend == "transformers" and self.model and _looks_like_local_path(self.model):
            if not (Path(self.model).expanduser() / "config.json").is_file():
                raise ValueError(f"model path '{self.model}' has no config.json")
        return self


class AnnotateConfig(_Strict):
    prompt_version: str = "v1"
    word_num: tuple[int, int] = (60, 100)
    n_demos: Annotated[int, Field(ge=0, le=50)] = 5
    min_instructions: Annotated[int, Field(ge=1)] = 3
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    batch_size: Annotated[int, Field(ge=1)] = 256
    describe: StepConfig = StepConfig()
    instruct: StepConfig = StepConfig()

    @field_validator("word_num")
    @classmethod
    def _word_num_ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not (1 <= lo <= hi):
            raise ValueError(f"word_num must be [lo, hi] with 1 <= lo <= hi, got [{lo}, {hi}]")
        return value


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
