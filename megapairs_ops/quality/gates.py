"""Great Expectations gates between stages.

Each gate reads one stage's artifact with pyarrow, derives helper columns for rules GX cannot
express on a pandas batch (list lengths, membership, per-encoder bands), runs the suite
`megapairs_<stage>[_<encoder>]` through a Checkpoint and refreshes the run's Data Docs. A failed
suite raises `ValidationFailed` with a one-line message, so the Airflow task fails readably and
downstream tasks never start.

GX is imported lazily (DAG parsing must stay fast) and one file-backed context per GX project
is cached per process. Every GX call for a project runs under a lock (threads and processes),
because a GX project keeps datasources in one YAML file that each run rewrites.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megapairs_ops.config import MaxGate, PipelineConfig
from megapairs_ops.storage import RunLayout, read_json, write_json

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

STAGES = ("ingest", "mining", "pairs", "triplets")
DOCS_SITE = "megapairs"
DATASOURCE = "megapairs"
BATCH_DEFINITION = "whole_dataframe"
# Enough unexpected values to recognise a problem in the error line and Data Docs, few enough
# to keep result JSON small on large tables.
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 5}

_STR = pa.string()
_LIST_STR = pa.list_(pa.string())

IMAGES_SCHEMA = {
    "image_id": _STR,
    "sha256": _STR,
    "path": _STR,
    "caption": _STR,
    "width": pa.int32(),
    "height": pa.int32(),
    "mode": _STR,
    "phash": pa.int64(),
    "file_bytes": pa.int64(),
    "duplicate_paths": _LIST_STR,
}
CANDIDATES_SCHEMA = {"q_id": _STR, "t_id": _STR, "sim": pa.float32(), "rank": pa.int32()}
PAIRS_SCHEMA = {
    "pair_id": _STR,
    "q_id": _STR,
    "t_id": _STR,
    "encoders": _LIST_STR,
    "sims": pa.list_(pa.float32()),
    "max_sim": pa.float32(),
    "hn_ids": _LIST_STR,
}
TRIPLETS_SCHEMA = {
    "q_img": _STR,
    "q_text": _LIST_STR,
    "t_img": _STR,
    "hns": _LIST_STR,
    "pair_id": _STR,
    "q_id": _STR,
    "t_id": _STR,
    "encoders": _LIST_STR,
    "sims": pa.list_(pa.float32()),
    "description": _STR,
    "word_num": pa.int32(),
    "describe_model": _STR,
    "instruct_model": _STR,
    "describe_backend": _STR,
    "instruct_backend": _STR,
    "prompt_version": _STR,
    "run_id": _STR,
}

SCHEMAS = {
    "ingest": IMAGES_SCHEMA,
    "mining": CANDIDATES_SCHEMA,
    "pairs": PAIRS_SCHEMA,
    "triplets": TRIPLETS_SCHEMA,
}

# The pandas dtype each scalar Arrow type becomes in `_to_pandas`: nullable dtypes, so a
# column with nulls keeps its declared type instead of silently turning into float64.
_PANDAS_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "string",
    pa.int32(): "Int32",
    pa.int64(): "Int64",
    pa.float32(): "Float32",
    pa.float64(): "Float64",
    pa.bool_(): "boolean",
}


class ValidationFailed(RuntimeError):
    """A stage's output broke its suite; the message is one line meant for the task log."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps `result` when the exception crosses a process boundary (executors pickle it).
        return type(self), (str(self), self.result)


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
class _Batch:
    df: pd.DataFrame
    rules: list[Rule]
    warnings: list[str] = field(default_factory=list)
    # One record per configured gate (see `_gate`), evaluated or not.
    gates: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- helper columns (pyarrow)


def _type_label(t: pa.DataType) -> str:
    # Parquet renames list items ("item" -> "element"); compare value types only.
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_label(t.value_type)}>"
    return str(t)


def _combined(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _lengths(lists: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)


def _row_counts(parents: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """How many list items of each row satisfy `mask` (items given as parent row indices)."""
    return np.bincount(parents[mask], minlength=n)[:n]


def _parents(lists: pa.Array) -> np.ndarray:
    return pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)


def _first_items(lists: pa.Array) -> pa.Array:
    """Element 0 of each list, null where the list is empty or null (`list_element` would
    raise on an empty list instead)."""
    firsts = pc.list_slice(lists, 0, 1)
    parents = _parents(firsts)
    position = np.full(len(lists), -1, dtype=np.int64)
    position[parents] = np.arange(len(parents))
    return pc.take(pc.list_flatten(firsts), pa.array(position, mask=position < 0))


def _contains(lists: pa.Array, needles: pa.Array) -> np.ndarray:
    """Row-wise: does list i contain needles[i]?"""
    parents = _parents(lists)
    flat = pc.list_flatten(lists)
    hits = pc.fill_null(pc.equal(flat, pc.take(needles, pa.array(parents))), False)
    return _row_counts(parents, hits.to_numpy(zero_copy_only=False), len(lists)) > 0


def _distinct_counts(lists: pa.Array) -> np.ndarray:
    parents = _parents(lists)
    flat = pc.list_flatten(lists)
    counts = np.zeros(len(lists), dtype=np.int64)
    if len(flat):
        grouped = pa.table({"row": parents, "value": flat}).group_by("row").aggregate(
            [("value", "count_distinct")]
        )
        counts[grouped["row"].to_numpy()] = grouped["value_count_distinct"].to_numpy()
    return counts


def _sims_in_band(encoders: pa.Array, sims: pa.Array, cfg: PipelineConfig) -> np.ndarray:
    """Row-wise: every sims[j] lies strictly inside the band of encoders[j] (unknown encoder or
    misaligned lists count as out of band)."""
    n = len(encoders)
    aligned = _lengths(encoders) == _lengths(sims)
    ok = aligned.copy()
    rows = np.flatnonzero(aligned)
    if len(rows):
        enc_rows, sim_rows = pc.take(encoders, rows), pc.take(sims, rows)
        names = [e.name for e in cfg.encoders]
        lo = np.array([e.band[0] for e in cfg.encoders] + [np.nan])
        hi = np.array([e.band[1] for e in cfg.encoders] + [np.nan])
        which = pc.fill_null(pc.index_in(pc.list_flatten(enc_rows), pa.array(names)), len(names))
        which = which.to_numpy(zero_copy_only=False)
        values = pc.list_flatten(sim_rows).to_numpy(zero_copy_only=False).astype(np.float64)
        inside = (values > lo[which]) & (values < hi[which])  # NaN bounds or values: outside
        bad = _row_counts(_parents(enc_rows), ~inside, len(rows))
        ok[rows] = bad == 0
    return ok[:n]


def _with_helpers(table: pa.Table, helpers: dict[str, Any]) -> pa.Table:
    for name, values in helpers.items():
        table = table.append_column(name, pa.array(values))
    return table


def _derive(table: pa.Table, derivations: dict[str, Any]) -> pa.Table:
    """Add each helper column whose inputs exist; a helper that cannot be derived (missing or
    mistyped input) is left out, so its expectation fails naming the column instead of this
    function crashing."""
    helpers: dict[str, Any] = {}
    for name, derive in derivations.items():
        try:
            helpers[name] = derive(table)
        except (KeyError, pa.ArrowException, TypeError, ValueError):
            continue
    return _with_helpers(table, helpers)


# ---------------------------------------------------------------- rules


def _schema_rules(
    table: pa.Table, schema: dict[str, pa.DataType], exact_with: list[str] | None = None
) -> tuple[list[Rule], dict[str, Any]]:
    """Presence of the columns, then one type rule per column. Scalars are checked on their
    pandas dtype; list columns get `<col>__type` helper columns holding the Arrow type,
    because pandas has no dtype name for a nested Arrow type.

    `exact_with` (the helper columns derived so far) makes the column rule exact: the released
    format must not grow columns silently; internal artifacts may carry extra ones."""
    type_helpers = [f"{c}__type" for c, t in schema.items() if t not in _PANDAS_DTYPES]
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
        if arrow_type in _PANDAS_DTYPES:
            rules.append(
                Rule(f"{col}_type", "ExpectColumnTypeToBe",
                     {"column": col, "type_": _PANDAS_DTYPES[arrow_type]},
                     f"{col} is {_type_label(arrow_type)}")
            )
        else:
            label = _type_label(arrow_type)
            if col in table.column_names:
                actual = _type_label(table.schema.field(col).type)
                helpers[f"{col}__type"] = pa.DictionaryArray.from_arrays(
                    np.zeros(table.num_rows, dtype=np.int8), pa.array([actual]))
            rules.append(
                Rule(f"{col}_type", "ExpectColumnValuesToBeInSet",
                     {"column": f"{col}__type", "value_set": [label]}, f"{col} is {label}")
            )
    return rules, helpers


def _not_null(*cols: str) -> list[Rule]:
    return [
        Rule(f"{c}_not_null", "ExpectColumnValuesToNotBeNull", {"column": c}, f"{c} is set")
        for c in cols
    ]


def _regex(name: str, col: str, regex: str, what: str) -> Rule:
    return Rule(name, "ExpectColumnValuesToMatchRegex", {"column": col, "regex": regex}, what)


def _is(name: str, col: str, value: Any, what: str) -> Rule:
    return Rule(name, "ExpectColumnValuesToBeInSet", {"column": col, "value_set": [value]}, what)


def _between(name: str, col: str, what: str, **bounds: Any) -> Rule:
    return Rule(name, "ExpectColumnValuesToBeBetween", {"column": col, **bounds}, what)


def _unique(name: str, *cols: str) -> Rule:
    if len(cols) == 1:
        return Rule(name, "ExpectColumnValuesToBeUnique", {"column": cols[0]},
                    f"{cols[0]} is unique")
    return Rule(name, "ExpectCompoundColumnsToBeUnique", {"column_list": list(cols)},
                f"({', '.join(cols)}) is unique")


def _min_rows(name: str, what: str) -> Rule:
    return Rule(name, "ExpectTableRowCountToBeBetween", {"min_value": 1}, what)


def _ne(a: str, b: str) -> Any:
    return lambda t: pc.fill_null(pc.not_equal(_combined(t, a), _combined(t, b)), False)


HEX16, HEX64 = r"^[0-9a-f]{16}$", r"^[0-9a-f]{64}$"

# How a gate's figure is read off its helper column: run-level figures ride along as constant
# columns (so GX reports them as observed values in Data Docs), per-row figures are aggregated.
_AGGREGATES = {"max": "ExpectColumnMaxToBeBetween", "min": "ExpectColumnMinToBeBetween",
               "mean": "ExpectColumnMeanToBeBetween"}


def _gate(
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


def _constant(value: float | None, n: int) -> np.ndarray:
    return np.full(n, np.nan if value is None else value, dtype=np.float64)


def _rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows if Path(path).is_file() else 0


def _top_counts(path: Path, column: str, top: int = 3) -> str:
    """'a: 3, b: 1' for the most frequent values of `column` in a problems table."""
    if not Path(path).is_file():
        return ""
    counts = pc.value_counts(pq.read_table(path, columns=[column]).column(column).combine_chunks())
    pairs = sorted(((c["values"].as_py(), c["counts"].as_py()) for c in counts), key=lambda x: -x[1])
    return ", ".join(f"{v}: {n}" for v, n in pairs[:top])


# ---------------------------------------------------------------- stages


def _read(path: Path, what: str) -> pa.Table:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found at {path}; run the stage that writes it first")
    return pq.read_table(path)


def _ingest_batch(cfg: PipelineConfig, layout: RunLayout) -> _Batch:
    table = _read(layout.images, "ingest output")
    helpers = {"sha256_prefix": lambda t: pc.utf8_slice_codeunits(_combined(t, "sha256"), 0, 16)}
    table = _derive(table, helpers)
    rules, type_helpers = _schema_rules(table, IMAGES_SCHEMA)
    m = cfg.ingest.min_side
    rules += [
        _min_rows("has_usable_images", "no usable images: ingest kept zero rows"),
        *_not_null("image_id", "sha256", "path", "caption"),
        _unique("image_id_unique", "image_id"),
        _regex("image_id_16_hex", "image_id", HEX16, "image_id is 16 lowercase hex chars"),
        _regex("sha256_64_hex", "sha256", HEX64, "sha256 is 64 lowercase hex chars"),
        Rule("image_id_is_sha256_prefix", "ExpectColumnPairValuesToBeEqual",
             {"column_A": "image_id", "column_B": "sha256_prefix"},
             "image_id is the first 16 chars of sha256"),
        _regex("caption_not_blank", "caption", r"\S", "caption has a non-space character"),
        _between("width_min_side", "width", f"width >= ingest.min_side ({m})", min_value=m),
        _between("height_min_side", "height", f"height >= ingest.min_side ({m})", min_value=m),
        _between("file_bytes_positive", "file_bytes", "file_bytes > 0", min_value=1),
    ]
    gate_rules, gates, figures = _ingest_gates(cfg, layout, table)
    table = _with_helpers(table, figures)
    return _Batch(_to_pandas(_with_helpers(table, type_helpers)), rules + gate_rules, gates=gates)


def _ingest_gates(
    cfg: PipelineConfig, layout: RunLayout, table: pa.Table
) -> tuple[list[Rule], list[dict[str, Any]], dict[str, Any]]:
    """Quarantine and exact-duplicate rates over every input ingest saw (usable images, the
    copies collapsed into them, and the quarantined inputs)."""
    n = table.num_rows
    try:
        duplicates = int(_lengths(_combined(table, "duplicate_paths")).sum())
    except (KeyError, pa.ArrowException):
        duplicates = 0
    quarantine = layout.quarantine_part("ingest")
    quarantined = _rows(quarantine)
    items = n + duplicates + quarantined
    rates = {
        "quarantine_rate": quarantined / items if items else None,
        "duplicate_rate": duplicates / items if items else None,
    }
    details = {
        "quarantine_rate": f"{quarantined} of {items} inputs quarantined"
        + (f" ({_top_counts(quarantine, 'reason')})" if quarantined else ""),
        "duplicate_rate": f"{duplicates} of {items} inputs were exact copies of another",
    }
    whats = {"quarantine_rate": "share of inputs quarantined",
             "duplicate_rate": "share of inputs that are exact duplicates"}
    rules, gates = [], []
    for key, value in rates.items():
        rule, record = _gate(cfg, key, key, whats[key], value, items, detail=details[key])
        rules += [rule] if rule else []
        gates.append(record)
    return rules, gates, {k: _constant(v, n) for k, v in rates.items()}


def _mining_batch(cfg: PipelineConfig, layout: RunLayout, encoder: str) -> _Batch:
    enc = cfg.encoder(encoder)
    lo, hi = enc.band
    table = _read(layout.candidates(encoder), f"mining output for encoder '{encoder}'")
    table = _derive(table, {
        "q_ne_t": _ne("q_id", "t_id"),
        "targets_of_q": lambda t: _group_sizes(_combined(t, "q_id")),
    })
    rules, type_helpers = _schema_rules(table, CANDIDATES_SCHEMA)
    k = cfg.mining.max_targets_per_query
    rules += [
        *_not_null("q_id", "t_id", "sim", "rank"),
        _is("q_ne_t", "q_ne_t", True, "a query is never its own target"),
        _between("sim_in_band", "sim", f"{lo} < sim < {hi} (band of encoder '{encoder}')",
                 min_value=lo, max_value=hi, strict_min=True, strict_max=True),
        _between("rank_positive", "rank", "rank >= 1", min_value=1),
        _between("max_targets_per_query", "targets_of_q",
                 f"at most mining.max_targets_per_query ({k}) rows per q_id", max_value=k),
        _unique("q_t_unique", "q_id", "t_id"),
    ]
    warn = [f"no candidate pairs in band ({lo}, {hi}) for encoder '{encoder}'"]
    warn = warn if not table.num_rows else []
    return _Batch(_to_pandas(_with_helpers(table, type_helpers)), rules, warn)


def _group_sizes(keys: pa.Array) -> np.ndarray:
    codes = pc.dictionary_encode(keys, null_encoding="encode").indices.to_numpy()
    return np.bincount(codes)[codes] if len(codes) else np.zeros(0, dtype=np.int64)


def _pair_ids(t: pa.Table) -> pa.Array:
    q, tt = _combined(t, "q_id").to_pylist(), _combined(t, "t_id").to_pylist()
    return pa.array([hashlib.sha256(f"{a}:{b}".encode()).hexdigest()[:16] for a, b in zip(q, tt)],
                    type=pa.string())


def _pairs_batch(cfg: PipelineConfig, layout: RunLayout) -> _Batch:
    table = _read(layout.pairs, "pairs output")
    table = _derive(table, {
        "expected_pair_id": _pair_ids,
        "q_ne_t": _ne("q_id", "t_id"),
        "n_hns": lambda t: _lengths(_combined(t, "hn_ids")),
        "t_in_hns": lambda t: _contains(_combined(t, "hn_ids"), _combined(t, "t_id")),
        "q_in_hns": lambda t: _contains(_combined(t, "hn_ids"), _combined(t, "q_id")),
        "n_encoders": lambda t: _lengths(_combined(t, "encoders")),
        "sims_in_band": lambda t: _sims_in_band(
            _combined(t, "encoders"), _combined(t, "sims"), cfg),
    })
    rules, type_helpers = _schema_rules(table, PAIRS_SCHEMA)
    n = cfg.mining.n_hard_negatives
    rules += [
        *_not_null("pair_id", "q_id", "t_id"),
        _unique("pair_id_unique", "pair_id"),
        Rule("pair_id_from_ids", "ExpectColumnPairValuesToBeEqual",
             {"column_A": "pair_id", "column_B": "expected_pair_id"},
             "pair_id == sha256(f'{q_id}:{t_id}')[:16]"),
        _unique("q_t_unique", "q_id", "t_id"),
        _is("q_ne_t", "q_ne_t", True, "a query is never its own target"),
        _between("hn_count", "n_hns", f"len(hn_ids) == mining.n_hard_negatives ({n})",
                 min_value=n, max_value=n),
        _is("t_not_in_hns", "t_in_hns", False, "the target is never a hard negative"),
        _is("q_not_in_hns", "q_in_hns", False, "the query is never a hard negative"),
        _between("encoders_non_empty", "n_encoders", "at least one encoder found the pair",
                 min_value=1),
        _is("sims_in_band", "sims_in_band", True,
            "every sims[j] is strictly inside the band of encoders[j]"),
    ]
    warn = [] if table.num_rows else ["pairs table is empty: no pair survived mining and dedup"]
    gate_rules, gates, found = _encoder_share_gates(cfg, table)
    table = _with_helpers(table, found)
    return _Batch(_to_pandas(_with_helpers(table, type_helpers)), rules + gate_rules, warn, gates)


def _encoder_share_gates(
    cfg: PipelineConfig, table: pa.Table
) -> tuple[list[Rule], list[dict[str, Any]], dict[str, Any]]:
    """Per encoder, the share of pairs it found: an encoder that silently stopped working
    (constant vectors, a wrong band) finds next to none."""
    n = table.num_rows
    try:
        encoders = _combined(table, "encoders")
        parents, flat = _parents(encoders), pc.list_flatten(encoders)
    except (KeyError, pa.ArrowException):
        return [], [], {}
    rules, gates, helpers = [], [], {}
    for enc in (e.name for e in cfg.encoders):
        hits = pc.fill_null(pc.equal(flat, enc), False).to_numpy(zero_copy_only=False)
        found = (_row_counts(parents, hits, n) > 0).astype(np.float64)
        column = f"found_by__{enc}"
        helpers[column] = found
        share = float(found.mean()) if n else None
        rule, record = _gate(
            cfg, "encoder_share", column, f"share of pairs found by encoder '{enc}'", share, n,
            aggregate="mean", name=f"encoder_share_{enc}",
            detail=f"{int(found.sum())} of {n} pairs found by '{enc}'",
        )
        rules += [rule] if rule else []
        gates.append(record)
    return rules, gates, helpers


def _read_triplets(layout: RunLayout) -> pa.Table:
    parts = sorted(Path(layout.triplets_dir).glob("part-*.parquet"))
    if not parts:
        return pa.schema(list(TRIPLETS_SCHEMA.items())).empty_table()
    # The whole release is loaded because the uniqueness rules span parts, and every column
    # because the schema rules cover them all; the pandas frame shares the Arrow buffers, so
    # peak memory is about the release's Arrow size. Tens of millions of rows want a streaming
    # pass instead: row rules per part, uniqueness on the key columns only.
    tables = [pq.read_table(p) for p in parts]
    try:
        # Permissive: a part with a wider type (list<double> for sims) is reported by the type
        # rules instead of failing the read.
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        odd = next(p.name for p, t in zip(parts, tables) if not t.schema.equals(tables[0].schema))
        raise ValidationFailed(
            f"triplets validation failed: part files have incompatible schemas ({odd} differs "
            f"from {parts[0].name}: {str(exc).splitlines()[0]})",
            {"suite": suite_name("triplets"), "success": False,
             "failed_expectations": ["part_schemas_compatible"]},
        ) from None


def _triplets_batch(cfg: PipelineConfig, layout: RunLayout) -> _Batch:
    table = _read_triplets(layout)
    figures = _instruction_figures(cfg, layout, table)
    failed, attempted = _annotate_outcomes(layout)
    failure_rate = failed / attempted if attempted else None
    helpers = {
        "q_ne_t_img": _ne("q_img", "t_img"),
        "hns0_is_q": lambda t: pc.fill_null(
            pc.equal(_first_items(_combined(t, "hns")), _combined(t, "q_img")), False),
        "t_in_hns": lambda t: _contains(_combined(t, "hns"), _combined(t, "t_img")),
        "n_hns": lambda t: _lengths(_combined(t, "hns")),
        "n_instructions": lambda t: _lengths(_combined(t, "q_text")),
        "n_distinct_instructions": lambda t: _distinct_counts(
            _strip_lists(_combined(t, "q_text"))),
        "n_blank_instructions": lambda t: _blank_counts(_combined(t, "q_text")),
        "sims_in_band": lambda t: _sims_in_band(
            _combined(t, "encoders"), _combined(t, "sims"), cfg),
        "text_check": lambda t: _text_checks(t, cfg),
        # gate figures; left out (and their rules fail naming them) when q_text is unusable
        "instruction_share": lambda t: figures["instruction_share_per_row"],
        "opening_share": lambda t: figures["opening_share_per_row"],
        "distinct_2gram_ratio": lambda t: _constant(figures["distinct_2"], t.num_rows),
        "failure_rate": lambda t: _constant(failure_rate, t.num_rows),
    }
    table = _derive(table, helpers)
    rules, type_helpers = _schema_rules(table, TRIPLETS_SCHEMA, exact_with=list(helpers))
    n, m = cfg.mining.n_hard_negatives, cfg.annotate.min_instructions
    w_lo, w_hi = cfg.annotate.word_num
    rules += [
        _min_rows("has_triplets", "nothing to publish: zero triplets"),
        *_not_null("q_img", "t_img", "pair_id", "run_id", "prompt_version"),
        _is("q_ne_t_img", "q_ne_t_img", True, "q_img != t_img"),
        _is("hns0_is_q_img", "hns0_is_q", True, "hns[0] == q_img"),
        _is("t_img_not_in_hns", "t_in_hns", False, "t_img is not among hns"),
        _between("hns_count", "n_hns", f"len(hns) == mining.n_hard_negatives + 1 ({n + 1})",
                 min_value=n + 1, max_value=n + 1),
        _between("min_instructions", "n_instructions",
                 f"len(q_text) >= annotate.min_instructions ({m})", min_value=m),
        _between("min_distinct_instructions", "n_distinct_instructions",
                 f"at least {m} distinct instructions", min_value=m),
        _between("no_blank_instructions", "n_blank_instructions",
                 "no instruction is blank", max_value=0),
        _between("word_num_in_range", "word_num",
                 f"annotate.word_num range ({w_lo}..{w_hi})", min_value=w_lo, max_value=w_hi),
        _is("sims_in_band", "sims_in_band", True,
            "every sims[j] is strictly inside the band of encoders[j]"),
        _is("text_passes_output_checks", "text_check", "",
            "description and instructions pass annotate's output checks (unexpected values name the check)"),
        _unique("q_t_img_unique", "q_img", "t_img"),
        _unique("pair_id_unique", "pair_id"),
    ]
    n_rows = table.num_rows
    f = figures or {}
    top = (f.get("top_instructions") or [{}])[0]
    opening = (f.get("top_openings") or [{}])[0]
    specs = [
        ("mean_instructions", "n_instructions", "mean instructions per triplet",
         pc.mean(table.column("n_instructions")).as_py() if "n_instructions" in table.column_names else None,
         n_rows, "mean", ""),
        ("instruction_share", "instruction_share", "share of triplets holding the most common instruction",
         f.get("instruction_share"), n_rows, None,
         f"{top.get('instruction', '')!r} in {top.get('pairs', 0)} of {n_rows} triplets" if top else ""),
        ("opening_share", "opening_share", "share of instructions opening with the most common three words",
         f.get("opening_share"), n_rows, None,
         f"{opening.get('opening', '')!r} opens {opening.get('instructions', 0)} of "
         f"{f.get('instructions', 0)} instructions" if opening else ""),
        ("distinct_2gram_ratio", "distinct_2gram_ratio", "distinct word bigrams / all bigrams (sample)",
         f.get("distinct_2"), n_rows, None,
         f"on a seeded sample of {f.get('distinct_n_sample', 0)} instructions"),
        ("failure_rate", "failure_rate", "share of annotated pairs that failed annotation",
         failure_rate, attempted, None,
         f"{failed} of {attempted} pairs failed"
         + (f" ({_top_counts(layout.failures_part('annotate'), 'reason')})" if failed else "")),
    ]
    gate_rules, gates = [], []
    for key, column, what, observed, rows, aggregate, detail in specs:
        rule, record = _gate(cfg, key, column, what, observed, rows, aggregate, detail=detail)
        gate_rules += [rule] if rule else []
        gates.append(record)
    return _Batch(_to_pandas(_with_helpers(table, type_helpers)), rules + gate_rules, gates=gates)


def _text_checks(table: pa.Table, cfg: PipelineConfig) -> pa.Array:
    """Per triplet, the reason its text would fail annotate's output checks ('' when it passes):
    the last line of defence, so that no damaged answer is published whatever path it came by."""
    from megapairs_ops.stages.annotate.checks import TextRules, check_annotation

    rules = TextRules.from_config(cfg.annotate.checks)
    rows = zip(*(_combined(table, c).to_pylist() for c in ("description", "q_text", "word_num")))
    return pa.array([check_annotation(d, q or [], w or 0, cfg.annotate, rules) for d, q, w in rows], pa.string())


def _instruction_figures(cfg: PipelineConfig, layout: RunLayout, table: pa.Table) -> dict[str, Any] | None:
    from megapairs_ops.quality.instruction_stats import instruction_stats

    try:
        return instruction_stats(table, per_row=True, top=1, spill_dir=layout.spill_dir("publish"),
                                 memory_limit=cfg.pairs.memory_limit)
    except Exception as exc:  # a malformed q_text is the schema rules' to report, not a crash
        log.debug("instruction statistics unavailable: %s", exc)
        return None


def _annotate_outcomes(layout: RunLayout) -> tuple[int, int]:
    """(pairs that failed annotation, pairs annotation finished with: accepted + failed)."""
    failed = _rows(layout.failures_part("annotate"))
    return failed, failed + _rows(layout.annotations)


def _strip_lists(lists: pa.Array) -> pa.Array:
    # Instructions that differ only by surrounding whitespace are the same instruction.
    return pa.ListArray.from_arrays(
        _list_offsets(lists), pc.utf8_trim_whitespace(pc.list_flatten(lists))
    )


def _list_offsets(lists: pa.Array) -> pa.Array:
    lengths = _lengths(lists)
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _blank_counts(lists: pa.Array) -> np.ndarray:
    flat = pc.list_flatten(lists)
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(flat), ""), True)
    return _row_counts(_parents(lists), blank.to_numpy(zero_copy_only=False), len(lists))


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    import pandas as pd

    # Arrow-backed strings share the table's buffers instead of one Python str per value.
    dtypes = {"string": pd.StringDtype("pyarrow")}

    def mapper(t: pa.DataType) -> Any:
        if t in _PANDAS_DTYPES:
            name = _PANDAS_DTYPES[t]
            return dtypes.get(name) or pd.api.types.pandas_dtype(name)
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return pd.ArrowDtype(t)  # one Arrow buffer instead of one ndarray per row
        return None

    return table.to_pandas(types_mapper=mapper)


# ---------------------------------------------------------------- GX plumbing

_LOCK = threading.RLock()
# gx_dir -> (context, signature of its config file when this process last wrote or read it);
# bounded, since a long-lived worker validates many runs.
_CONTEXTS: OrderedDict[Path, tuple[Any, tuple[int, int] | None]] = OrderedDict()
_MAX_CONTEXTS = 8


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # GX's own deprecation noise (e.g. importing sre_constants) says nothing about our data.
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"great_expectations(\.|$)")


@contextmanager
def _project_lock(gx_dir: Path) -> Iterator[None]:
    """Serialise GX work on one project: threads via an RLock, processes (several Airflow
    tasks of one run) via flock on a file next to the project."""
    gx_dir.mkdir(parents=True, exist_ok=True)
    with _LOCK, open(gx_dir / ".validate.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _config_signature(context: Any) -> tuple[int, int] | None:
    path = Path(context.root_directory) / "great_expectations.yml"
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _context(layout: RunLayout) -> Any:
    """The cached file context of this run's GX project, rebuilt when another process changed
    its config since this process last wrote it (else our next save would drop their edits)."""
    import great_expectations as gx
    from great_expectations.data_context.data_context.context_factory import set_context
    from great_expectations.data_context.types.base import ProgressBarsConfig

    key = Path(layout.gx_dir)
    cached = _CONTEXTS.get(key)
    if cached and _config_signature(cached[0]) == cached[1]:
        _CONTEXTS.move_to_end(key)
        set_context(cached[0])
        return cached[0]
    context = gx.get_context(mode="file", project_root_dir=str(key))
    docs_dir = Path(layout.data_docs_dir)
    # Relative to the context root, so a run directory can be moved and its docs still build.
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": os.path.relpath(docs_dir, context.root_directory) + "/",
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    variables = context.variables
    changed = False
    if variables.data_docs_sites != {DOCS_SITE: site}:
        variables.data_docs_sites = {DOCS_SITE: site}
        changed = True
    if variables.analytics_enabled is not False:
        variables.analytics_enabled = False
        changed = True
    bars = variables.progress_bars
    if not bars or bars.get("globally") is not False:
        variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        changed = True
    if changed:
        variables.save()
    # Data Docs append this id to the GX logo URL, so opening the docs would report the
    # project to GX's servers; in memory only, the id is re-derived from the stores on load.
    variables.data_context_id = None
    _CONTEXTS[key] = (context, _config_signature(context))
    _CONTEXTS.move_to_end(key)
    while len(_CONTEXTS) > _MAX_CONTEXTS:
        _CONTEXTS.popitem(last=False)
    return context


def _batch_definition(context: Any, asset_name: str) -> Any:
    try:
        source = context.data_sources.get(DATASOURCE)
    except (KeyError, ValueError, LookupError):
        source = context.data_sources.add_pandas(DATASOURCE)
    from great_expectations.exceptions import DataContextError

    try:
        asset = source.get_asset(asset_name)
    except (LookupError, DataContextError):
        asset = source.add_dataframe_asset(asset_name)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION)
    except (KeyError, LookupError, DataContextError):
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)


def _build_expectation(rule: Rule) -> Any:
    import great_expectations.expectations as gxe

    cls = getattr(gxe, rule.expectation)
    # The rule name leads the description so Data Docs and the error line use the same words.
    return cls(**rule.kwargs, meta={"rule": rule.name},
               description=f"[{rule.name}] {rule.description}",
               severity="warning" if rule.severity == "warn" else "critical")


def _run_checkpoint(layout: RunLayout, suite_name: str, batch: _Batch) -> tuple[Any, Path]:
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    with _project_lock(Path(layout.gx_dir)):
        context = _context(layout)
        suite = gx.ExpectationSuite(
            name=suite_name, expectations=[_build_expectation(r) for r in batch.rules]
        )
        definition = gx.ValidationDefinition(
            name=suite_name, data=_batch_definition(context, suite_name), suite=suite
        )
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=suite_name,
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[DOCS_SITE])],
                result_format=RESULT_FORMAT,
            )
        )
        run_id = RunIdentifier(run_name=layout.root.name, run_time=datetime.now(timezone.utc))
        result = checkpoint.run(batch_parameters={"dataframe": batch.df}, run_id=run_id)
        _CONTEXTS[Path(layout.gx_dir)] = (context, _config_signature(context))
    return result, Path(layout.data_docs_dir) / "index.html"


# ---------------------------------------------------------------- public API


def suite_name(stage: str, encoder: str | None = None) -> str:
    return f"megapairs_{stage}" + (f"_{encoder}" if encoder else "")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _exception_message(info: dict[str, Any]) -> str | None:
    # GX reports either one exception or one per metric it could not compute.
    infos = [info] if "raised_exception" in info else list(info.values())
    for item in infos:
        if isinstance(item, dict) and item.get("raised_exception"):
            message = str(item.get("exception_message") or "error").splitlines()[0]
            return message.removeprefix("Error: ")[:160]
    return None


def _rule_name(res: Any) -> str:
    return (res.expectation_config.meta or {}).get("rule", res.expectation_config.type)


def _describe_failure(res: Any, schema: dict[str, pa.DataType]) -> str:
    """`rule (what was wrong)`, short enough for one log line."""
    rule = _rule_name(res)
    error = _exception_message(res.exception_info or {})
    if error:
        return f"{rule} (cannot evaluate: {error})"
    r = res.result or {}
    mismatched = (r.get("details") or {}).get("mismatched")
    if mismatched:
        # Helper columns missing only because their inputs are: name the inputs, not them.
        missing = [c for c in mismatched.get("missing") or [] if c in schema]
        extra = mismatched.get("unexpected") or []
        return f"{rule} (missing {missing}, unexpected {extra})"
    if "unexpected_count" in r:
        sample = ", ".join(repr(_plain(v)) for v in (r.get("partial_unexpected_list") or [])[:3])
        return f"{rule} ({r['unexpected_count']} of {r.get('element_count')} rows; e.g. {sample})"
    if "observed_value" in r:
        return f"{rule} (observed {str(r['observed_value'])[:120]})"
    return rule


def validate_stage(
    stage: str, cfg: PipelineConfig, layout: RunLayout, encoder: str | None = None
) -> dict[str, Any]:
    """Validate one stage's artifact; return a summary or raise `ValidationFailed`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; expected one of {', '.join(STAGES)}")
    if (stage == "mining") != (encoder is not None):
        raise ValueError("mining validation needs encoder=<name>; other stages take none")
    if stage == "ingest":
        batch = _ingest_batch(cfg, layout)
    elif stage == "mining":
        batch = _mining_batch(cfg, layout, encoder)  # type: ignore[arg-type]
    elif stage == "pairs":
        batch = _pairs_batch(cfg, layout)
    else:
        batch = _triplets_batch(cfg, layout)

    name = suite_name(stage, encoder)
    checkpoint_result, index = _run_checkpoint(layout, name, batch)
    (validation,) = checkpoint_result.run_results.values()
    # In suite order, so schema problems come first in the error line.
    order = {rule.name: i for i, rule in enumerate(batch.rules)}
    severity = {rule.name: rule.severity for rule in batch.rules}
    broken = sorted(
        (r for r in validation.results if not r.success),
        key=lambda r: order.get(_rule_name(r), len(order)),
    )
    failed = [r for r in broken if severity.get(_rule_name(r), "fail") == "fail"]
    warned = [r for r in broken if severity.get(_rule_name(r), "fail") == "warn"]
    gates = _gate_outcomes(batch.gates, validation.results)
    by_gate = {g["gate"]: g for g in gates}
    summary = {
        "suite": name,
        "success": not failed,
        "rows": len(batch.df),
        "evaluated": len(validation.results),
        "failed_expectations": [_rule_name(r) for r in failed],
        "warned_expectations": [_rule_name(r) for r in warned],
        "warnings": batch.warnings + [
            f"{stage} gate {_describe_gate(by_gate[_rule_name(r)])}" for r in warned
        ],
        "gates": gates,
        "data_docs": str(index),
    }
    # Kept beside the Data Docs so the curator report shows every gate, passed or not.
    write_json(summary, gate_results_path(layout, name))
    if failed:
        what = "; ".join(
            _describe_gate(by_gate[_rule_name(r)]) if _rule_name(r) in by_gate
            else _describe_failure(r, SCHEMAS[stage])
            for r in failed
        )
        raise ValidationFailed(
            f"{stage} validation failed (suite {name}, {len(failed)} of "
            f"{summary['evaluated']} expectations): {what}; Data Docs: {index}",
            summary,
        )
    return summary


def gate_results_path(layout: RunLayout, suite: str) -> Path:
    return Path(layout.reports_dir) / "gates" / f"{suite}.json"


def load_gate_results(layout: RunLayout) -> list[dict[str, Any]]:
    """Every suite's latest result in this run (as `validate_stage` returned or raised it)."""
    folder = Path(layout.reports_dir) / "gates"
    return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _gate_outcomes(gates: list[dict[str, Any]], results: list[Any]) -> list[dict[str, Any]]:
    """Each gate's status from its GX result; GX's observed value wins over ours."""
    by_rule = {_rule_name(r): r for r in results}
    out = []
    for gate in gates:
        gate = dict(gate)
        res = by_rule.get(gate["gate"])
        if res is not None:
            observed = (res.result or {}).get("observed_value")
            if isinstance(observed, (int, float, np.number)) and not isinstance(observed, bool):
                gate["observed"] = float(observed)
            gate["status"] = "pass" if res.success else gate["severity"]
        elif gate["status"] == "pending":
            gate["status"] = "skipped"
        out.append(gate)
    return out


def _describe_gate(gate: dict[str, Any]) -> str:
    """`instruction_share (observed 1 > max 0.2: 'Find ...' in 40 of 40 triplets)`."""
    observed = gate.get("observed")
    shown = "n/a" if observed is None else f"{observed:.3g}"
    sign = ">" if gate["bound"] == "max" else "<"
    detail = f": {gate['detail']}" if gate.get("detail") else ""
    return f"{gate['gate']} (observed {shown} {sign} {gate['bound']} {gate['threshold']}{detail})"
