"""The whole config: one typed, frozen model, loaded from YAML once and validated before any work
starts. Every problem is one line naming the offending key and what to do about it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, field_validator

from .annotate import AnnotateConfig
from .base import ConfigError, Strict, result_view
from .inputs import EmbedConfig, EncoderConfig, IngestConfig
from .mining import DuckDBConfig, MiningConfig, PairsConfig
from .quality import CurationConfig, GatesConfig, PublishConfig, ResourcesConfig, ValidationConfig


class PipelineConfig(Strict):
    seed: int = 0
    ingest: IngestConfig = IngestConfig()
    encoders: Annotated[list[EncoderConfig], Field(min_length=1)]
    embed: EmbedConfig = EmbedConfig()
    mining: MiningConfig = MiningConfig()
    pairs: PairsConfig = PairsConfig()
    duckdb: DuckDBConfig = DuckDBConfig()
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
        """A stable hash of config values without their runtime knobs: what a finished result
        was made from. The one fingerprint policy of every stage and work item."""
        payload = json.dumps(result_view(list(parts)), sort_keys=True)
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
