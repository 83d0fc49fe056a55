"""What every config section is built from: strict frozen models, the runtime-knob marker and the
result view that fingerprints are computed from, memory sizes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

from megapairs_ops.errors import ConfigError

__all__ = ["ConfigError", "MemorySize", "RUNTIME", "Strict", "parse_bytes", "result_view"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Runtime:
    """Marks a setting of how work runs (throughput, endpoints, memory, devices), never of what it
    produces. Runtime knobs are left out of every fingerprint, so changing one on a finished run
    re-runs nothing."""

    def __repr__(self) -> str:
        return "RUNTIME"


RUNTIME = _Runtime()


def is_runtime(model: type[BaseModel], field: str) -> bool:
    return any(m is RUNTIME for m in model.model_fields[field].metadata)


def result_view(value: Any) -> Any:
    """`value` as JSON-able data without its runtime knobs: what defines a stage's result."""
    if isinstance(value, BaseModel):
        cls = type(value)
        return {name: result_view(getattr(value, name)) for name in cls.model_fields if not is_runtime(cls, name)}
    if isinstance(value, (list, tuple)):
        return [result_view(v) for v in value]
    if isinstance(value, dict):
        return {str(k): result_view(v) for k, v in value.items()}
    return to_jsonable_python(value)


def looks_like_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int) -> int:
    """'8GB' (decimal, as DuckDB reads it), '8GiB' (binary) or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"'{value}' is not a memory size; write e.g. 8GB, 512MiB or a byte count")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def _memory_size(value: str | int) -> str | int:
    if parse_bytes(value) <= 0:
        raise ValueError(f"memory size must be positive, got '{value}'")
    return value


MemorySize = Annotated[str | int, AfterValidator(_memory_size)]
