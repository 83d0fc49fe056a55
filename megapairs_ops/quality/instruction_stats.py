"""Instruction statistics: counts, lengths, vocabulary, distinct-n-gram ratios and the most
repeated instructions and openings. One implementation (DuckDB, `sql/instruction_*.sql`) serves
both the publish gates (quality/gates.py) and the curator report, so the figure a gate
judged is the figure the report shows.

Two instructions are the same when they differ only in case, runs of spaces or end punctuation;
an opening is an instruction's first three words.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from megapairs_ops.db import open_session, sql

# Distinct-n ratios are taken on this many instructions (seeded sample), whatever the run's size.
DISTINCT_N_SAMPLE = 1000
# Parquet columns holding instruction lists: the triplets' q_text, annotations.parquet's instructions.
SOURCE_COLUMNS = ("q_text", "instructions")


@contextmanager
def _connect(settings: dict[str, Any] | None) -> Iterator[Any]:
    con = open_session(settings)
    try:
        yield con
    finally:
        con.close()


def _register_source(con: Any, source: pa.Table | Sequence[Path], column: str) -> None:
    if isinstance(source, pa.Table):
        table = pa.table({
            "row_id": pa.array(np.arange(source.num_rows, dtype=np.int64)),
            "pair_id": source.column("pair_id"),
            "q_text": source.column(column),
        })
        con.register("instruction_source_table", table)
        con.execute(sql("instruction_source_from_table"))
    else:
        paths = [str(p) for p in source]
        if not paths:
            con.execute(sql("instruction_source_empty"))
            return
        if column not in SOURCE_COLUMNS:
            raise ValueError(f"instruction lists are read from {SOURCE_COLUMNS}, not {column!r}")
        con.execute(sql(f"instruction_source_{column}"), {"paths": paths})
    con.execute(sql("instruction_rows"))


def instruction_stats(
    source: pa.Table | Sequence[Path],
    column: str = "q_text",
    top: int = 10,
    sample: int = DISTINCT_N_SAMPLE,
    per_row: bool = False,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Statistics of the instruction lists in `column` of an Arrow table or Parquet files (each
    with `pair_id`). With `per_row` (tables only) the result also holds `instruction_share_per_row`
    and `opening_share_per_row`, numpy arrays aligned with the table's rows."""
    with _connect(settings) as con:
        _register_source(con, source, column)
        cur = con.execute(sql("instruction_summary"))
        summary = dict(zip([d[0] for d in cur.description], cur.fetchall()[0]))
        sampled, uni, d_uni, bi, d_bi, vocabulary = con.execute(
            sql("instruction_ngram_diversity"), {"sample": sample}).fetchall()[0]
        per_pair = {int(n): int(c) for n, c in con.execute(sql("instruction_counts_per_pair")).fetchall()}
        lengths = {int(n): int(c) for n, c in con.execute(sql("instruction_length_histogram")).fetchall()}
        repeated = con.execute(sql("instruction_top_repeated"), {"top": top}).fetchall()
        openings = con.execute(sql("instruction_top_openings"), {"top": top}).fetchall()
        shares, n_rows = None, 0
        if per_row:
            if not isinstance(source, pa.Table):
                raise ValueError("per_row needs an Arrow table source")
            n_rows = source.num_rows
            shares = con.sql(sql("instruction_shares_per_row")).to_arrow_table()

    pairs, instructions = int(summary["pairs"]), int(summary["instructions"])
    stats: dict[str, Any] = {
        "pairs": pairs,
        "instructions": instructions,
        "mean_per_pair": instructions / pairs if pairs else 0.0,
        "per_pair": per_pair,
        "words": {k.removesuffix("_words"): float(v) for k, v in summary.items() if k.endswith("_words")},
        "length_histogram": lengths,
        "distinct_instructions": int(summary["distinct_instructions"]),
        "vocabulary": int(vocabulary),
        "distinct_n_sample": int(sampled),
        "distinct_1": d_uni / uni if uni else 0.0,
        "distinct_2": d_bi / bi if bi else 0.0,
        "top_instructions": [
            {"instruction": example, "pairs": int(n), "share": n / pairs if pairs else 0.0}
            for _, example, n in repeated
        ],
        "top_openings": [
            {"opening": opening, "instructions": int(n), "share": n / instructions if instructions else 0.0}
            for opening, n in openings
        ],
    }
    stats["instruction_share"] = stats["top_instructions"][0]["share"] if repeated else 0.0
    stats["opening_share"] = stats["top_openings"][0]["share"] if openings else 0.0
    if shares is not None:
        for name in ("instruction_share", "opening_share"):
            values = np.zeros(n_rows, dtype=np.float64)
            rows = shares.column("row_id").to_numpy()
            values[rows] = shares.column(name).to_numpy(zero_copy_only=False)
            stats[f"{name}_per_row"] = values
    return stats
