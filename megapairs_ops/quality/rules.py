"""What a gate checks, described without importing GX: a Rule names an expectation class and its
arguments; a Batch is the frame and rules of one suite. Builders for the common rules (schema,
not null, regex, ranges, uniqueness) and for the configured gates of `gates:`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megapairs_ops.config import MaxGate, PipelineConfig

from .columns import PANDAS_DTYPES, combined, type_label

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Rule:
    """One expectation, described without importing GX: `expectation` names a class in
    `great_expectations.expectations`; `name` is what failure messages and results report."""

    name: str
    expectation: str
    kwargs: dict[str, Any]
    description: str
    # "warn": a broken rule is reported and the stage still passes (GX severity "warning").
    severity: str = "fail"


@dataclass
class Batch:
    df: pd.DataFrame
    rules: list[Rule]
    warnings: list[str] = field(default_factory=list)
    # One record per configured gate (see `configured_gate`), evaluated or not.
    gates: list[dict[str, Any]] = field(default_factory=list)


def schema_rules(
    table: pa.Table, schema: dict[str, pa.DataType], exact_with: list[str] | None = None
) -> tuple[list[Rule], dict[str, Any]]:
    """Presence of the columns, then one type rule per column. Scalars are checked on their
    pandas dtype; list columns get `<col>__type` helper columns holding the Arrow type,
    because pandas has no dtype name for a nested Arrow type.

    `exact_with` (the helper columns derived so far) makes the column rule exact: the released
    format must not grow columns silently; internal artifacts may carry extra ones."""
    type_helpers = [f"{c}__type" for c, t in schema.items() if t not in PANDAS_DTYPES]
    exact = exact_with is not None
    rules = [
        Rule(
            "columns_match" if exact else "columns_present",
            "ExpectTableColumnsToMatchSet",
            {"column_set": list(schema) + (exact_with + type_helpers if exact else []),
             "exact_match": exact},
            "exactly the released columns" if exact else "the required columns exist",
        )
    ]
    helpers: dict[str, Any] = {}
    for col, arrow_type in schema.items():
        if arrow_type in PANDAS_DTYPES:
            rules.append(
                Rule(f"{col}_type", "ExpectColumnTypeToBe",
                     {"column": col, "type_": PANDAS_DTYPES[arrow_type]},
                     f"{col} is {type_label(arrow_type)}")
            )
        else:
            label = type_label(arrow_type)
            if col in table.column_names:
                actual = type_label(table.schema.field(col).type)
                helpers[f"{col}__type"] = pa.DictionaryArray.from_arrays(
                    np.zeros(table.num_rows, dtype=np.int8), pa.array([actual]))
            rules.append(
                Rule(f"{col}_type", "ExpectColumnValuesToBeInSet",
                     {"column": f"{col}__type", "value_set": [label]}, f"{col} is {label}")
            )
    return rules, helpers


def not_null(*cols: str) -> list[Rule]:
    return [
        Rule(f"{c}_not_null", "ExpectColumnValuesToNotBeNull", {"column": c}, f"{c} is set")
        for c in cols
    ]


def regex(name: str, col: str, regex: str, what: str) -> Rule:
    return Rule(name, "ExpectColumnValuesToMatchRegex", {"column": col, "regex": regex}, what)


def equals(name: str, col: str, value: Any, what: str) -> Rule:
    return Rule(name, "ExpectColumnValuesToBeInSet", {"column": col, "value_set": [value]}, what)


def between(name: str, col: str, what: str, **bounds: Any) -> Rule:
    return Rule(name, "ExpectColumnValuesToBeBetween", {"column": col, **bounds}, what)


def unique(name: str, *cols: str) -> Rule:
    if len(cols) == 1:
        return Rule(name, "ExpectColumnValuesToBeUnique", {"column": cols[0]},
                    f"{cols[0]} is unique")
    return Rule(name, "ExpectCompoundColumnsToBeUnique", {"column_list": list(cols)},
                f"({', '.join(cols)}) is unique")


def min_rows(name: str, what: str) -> Rule:
    return Rule(name, "ExpectTableRowCountToBeBetween", {"min_value": 1}, what)


def not_equal(a: str, b: str) -> Any:
    return lambda t: pc.fill_null(pc.not_equal(combined(t, a), combined(t, b)), False)


HEX16, HEX64 = r"^[0-9a-f]{16}$", r"^[0-9a-f]{64}$"


# How a gate's figure is read off its helper column: run-level figures ride along as constant
# columns (so GX reports them as observed values in Data Docs), per-row figures are aggregated.
_AGGREGATES = {"max": "ExpectColumnMaxToBeBetween", "min": "ExpectColumnMinToBeBetween",
               "mean": "ExpectColumnMeanToBeBetween"}


def configured_gate(
    cfg: PipelineConfig,
    key: str,
    column: str,
    what: str,
    observed: float | None,
    rows: int,
    aggregate: str | None = None,
    name: str | None = None,
    detail: str = "",
) -> tuple[Rule | None, dict[str, Any]]:
    """The rule for gate `gates.<key>` on helper column `column`, and the gate's record for
    results, stats and the report. A gate whose threshold is null is off; one judged on fewer
    than `gates.min_rows` rows is skipped (a share of a handful of rows says nothing)."""
    gate = getattr(cfg.gates, key)
    bound = "max" if isinstance(gate, MaxGate) else "min"
    threshold = getattr(gate, bound)
    record: dict[str, Any] = {
        "gate": name or key, "config": f"gates.{key}", "what": what, "severity": gate.severity,
        "bound": bound, "threshold": threshold, "observed": observed, "rows": rows,
        "detail": detail, "status": "pending",
    }
    if threshold is None:
        record["status"] = "off"
        return None, record
    if rows < cfg.gates.min_rows:
        record["status"] = "skipped"
        record["detail"] = f"{rows} rows < gates.min_rows ({cfg.gates.min_rows})"
        return None, record
    sign = "<=" if bound == "max" else ">="
    rule = Rule(
        record["gate"], _AGGREGATES[aggregate or bound], {"column": column, f"{bound}_value": threshold},
        f"{what} {sign} {threshold} (gates.{key}, {gate.severity})", severity=gate.severity,
    )
    return rule, record


def file_rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows if Path(path).is_file() else 0


def top_counts(path: Path, column: str, top: int = 3) -> str:
    """'a: 3, b: 1' for the most frequent values of `column` in a problems table."""
    if not Path(path).is_file():
        return ""
    counts = pc.value_counts(pq.read_table(path, columns=[column]).column(column).combine_chunks())
    pairs = sorted(((c["values"].as_py(), c["counts"].as_py()) for c in counts), key=lambda x: -x[1])
    return ", ".join(f"{v}: {n}" for v, n in pairs[:top])
