"""Helper columns for the gates, computed with pyarrow: rules GX cannot express on a pandas batch
(list lengths, membership, distinct counts, per-encoder bands) become plain columns a standard
expectation can check, and the table becomes an Arrow-backed pandas frame."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megapairs_ops.config import PipelineConfig

if TYPE_CHECKING:
    import pandas as pd


# The pandas dtype each scalar Arrow type becomes in `to_pandas`: nullable dtypes, so a
# column with nulls keeps its declared type instead of silently turning into float64.
PANDAS_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "string",
    pa.int32(): "Int32",
    pa.int64(): "Int64",
    pa.float32(): "Float32",
    pa.float64(): "Float64",
    pa.bool_(): "boolean",
}


def type_label(t: pa.DataType) -> str:
    # Parquet renames list items ("item" -> "element"); compare value types only.
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{type_label(t.value_type)}>"
    return str(t)


def combined(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def lengths(lists: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)


def row_counts(parents: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """How many list items of each row satisfy `mask` (items given as parent row indices)."""
    return np.bincount(parents[mask], minlength=n)[:n]


def parents(lists: pa.Array) -> np.ndarray:
    return pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)


def first_items(lists: pa.Array) -> pa.Array:
    """Element 0 of each list, null where the list is empty or null (`list_element` would
    raise on an empty list instead)."""
    firsts = pc.list_slice(lists, 0, 1)
    item_rows = parents(firsts)
    position = np.full(len(lists), -1, dtype=np.int64)
    position[item_rows] = np.arange(len(item_rows))
    return pc.take(pc.list_flatten(firsts), pa.array(position, mask=position < 0))


def contains(lists: pa.Array, needles: pa.Array) -> np.ndarray:
    """Row-wise: does list i contain needles[i]?"""
    item_rows = parents(lists)
    flat = pc.list_flatten(lists)
    hits = pc.fill_null(pc.equal(flat, pc.take(needles, pa.array(item_rows))), False)
    return row_counts(item_rows, hits.to_numpy(zero_copy_only=False), len(lists)) > 0


def distinct_counts(lists: pa.Array) -> np.ndarray:
    item_rows = parents(lists)
    flat = pc.list_flatten(lists)
    counts = np.zeros(len(lists), dtype=np.int64)
    if len(flat):
        grouped = pa.table({"row": item_rows, "value": flat}).group_by("row").aggregate(
            [("value", "count_distinct")]
        )
        counts[grouped["row"].to_numpy()] = grouped["value_count_distinct"].to_numpy()
    return counts


def sims_in_band(encoders: pa.Array, sims: pa.Array, cfg: PipelineConfig) -> np.ndarray:
    """Row-wise: every sims[j] lies strictly inside the band of encoders[j] (unknown encoder or
    misaligned lists count as out of band)."""
    n = len(encoders)
    aligned = lengths(encoders) == lengths(sims)
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
        bad = row_counts(parents(enc_rows), ~inside, len(rows))
        ok[rows] = bad == 0
    return ok[:n]


def group_sizes(keys: pa.Array) -> np.ndarray:
    codes = pc.dictionary_encode(keys, null_encoding="encode").indices.to_numpy()
    return np.bincount(codes)[codes] if len(codes) else np.zeros(0, dtype=np.int64)


def pair_ids(t: pa.Table) -> pa.Array:
    q, tt = combined(t, "q_id").to_pylist(), combined(t, "t_id").to_pylist()
    return pa.array([hashlib.sha256(f"{a}:{b}".encode()).hexdigest()[:16] for a, b in zip(q, tt)],
                    type=pa.string())


def strip_lists(lists: pa.Array) -> pa.Array:
    # Instructions that differ only by surrounding whitespace are the same instruction.
    return pa.ListArray.from_arrays(
        list_offsets(lists), pc.utf8_trim_whitespace(pc.list_flatten(lists))
    )


def list_offsets(lists: pa.Array) -> pa.Array:
    sizes = lengths(lists)
    return pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))


def blank_counts(lists: pa.Array) -> np.ndarray:
    flat = pc.list_flatten(lists)
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(flat), ""), True)
    return row_counts(parents(lists), blank.to_numpy(zero_copy_only=False), len(lists))


def constant(value: float | None, n: int) -> np.ndarray:
    return np.full(n, np.nan if value is None else value, dtype=np.float64)


def with_helpers(table: pa.Table, helpers: dict[str, Any]) -> pa.Table:
    for name, values in helpers.items():
        table = table.append_column(name, pa.array(values))
    return table


def derive(table: pa.Table, derivations: dict[str, Any]) -> pa.Table:
    """Add each helper column whose inputs exist; a helper that cannot be derived (missing or
    mistyped input) is left out, so its expectation fails naming the column instead of this
    function crashing."""
    helpers: dict[str, Any] = {}
    for name, derive in derivations.items():
        try:
            helpers[name] = derive(table)
        except (KeyError, pa.ArrowException, TypeError, ValueError):
            continue
    return with_helpers(table, helpers)


def to_pandas(table: pa.Table) -> pd.DataFrame:
    import pandas as pd

    # Arrow-backed strings share the table's buffers instead of one Python str per value.
    dtypes = {"string": pd.StringDtype("pyarrow")}

    def mapper(t: pa.DataType) -> Any:
        if t in PANDAS_DTYPES:
            name = PANDAS_DTYPES[t]
            return dtypes.get(name) or pd.api.types.pandas_dtype(name)
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return pd.ArrowDtype(t)  # one Arrow buffer instead of one ndarray per row
        return None

    return table.to_pandas(types_mapper=mapper)
