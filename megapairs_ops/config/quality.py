"""Config of publishing and of what decides whether it may happen: the gates, the curators'
rejects, and where the work runs in a deployment."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from megapairs_ops.deployment import RESOURCE_DEFAULTS

from .base import RUNTIME, Strict


class PublishConfig(Strict):
    part_rows: Annotated[int, Field(ge=1)] = 50_000
    jsonl: bool = True
    # DuckDB catalogue of published pairs and versions; default: catalogue.duckdb beside the run dirs.
    catalogue: Annotated[str | None, RUNTIME] = None


class ValidationConfig(Strict):
    enabled: bool = True


Severity = Literal["warn", "fail"]


class MaxGate(Strict):
    """A figure that must stay at or below `max`; null `max` turns the gate off."""

    max: float | None
    severity: Severity = "fail"


class MinGate(Strict):
    """A figure that must stay at or above `min`; null `min` turns the gate off."""

    min: float | None
    severity: Severity = "fail"


class GatesConfig(Strict):
    """Data-quality gates beyond schema (megapairs_ops.quality). `fail` fails the stage, so
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


class CurationConfig(Strict):
    """What curators decide (stages/publish/curation.py) and what the curator report compares with."""

    # CSV with columns kind (pair | image), id (a pair_id, or an image_id / sha256), reason.
    # Read at publish: listed pairs, and pairs whose query or target is a listed image, are
    # withheld; a relative path is taken from the working directory. Its content is in the
    # publish fingerprint, so editing the file re-publishes.
    rejects_file: str | None = None
    # A listed image that is a hard negative is replaced by another eligible negative from the
    # query's retrieved set ("replace"), or its pair is withheld ("drop").
    rejected_negatives: Literal["replace", "drop"] = "replace"
    # Report gallery: triplets sampled (seeded) per encoder that found them.
    gallery_per_encoder: Annotated[int, Field(ge=0, le=200), RUNTIME] = 4
    # The run the report compares with: "auto" (the latest other complete run in the same output
    # folder), a run directory, or null (no comparison).
    compare_with: Annotated[str | None, RUNTIME] = "auto"


class ResourcesConfig(Strict):
    """Where Airflow runs each kind of work item (queues and pools of a deployment); stages
    declare which kind their items are (pipeline/stage.py). All runtime knobs."""

    gpu_queue: Annotated[str, RUNTIME] = RESOURCE_DEFAULTS["gpu_queue"]
    gpu_pool: Annotated[str, RUNTIME] = RESOURCE_DEFAULTS["gpu_pool"]
    llm_pool: Annotated[str, RUNTIME] = RESOURCE_DEFAULTS["llm_pool"]
    # Slots of the pools that `megapairs airflow-pools` creates: GPU tasks in parallel, and annotation
    # tasks sharing the inference servers.
    gpu_pool_slots: Annotated[int, Field(ge=1), RUNTIME] = 1
    llm_pool_slots: Annotated[int, Field(ge=1), RUNTIME] = 4


__all__ = ["CurationConfig", "GatesConfig", "MaxGate", "MinGate", "PublishConfig", "ResourcesConfig", "Severity",
           "ValidationConfig"]
