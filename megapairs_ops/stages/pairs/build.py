"""Pairs: union of every encoder's candidates into one row per ordered (query, target), near-duplicate
drop, a per-query cap, and hard negatives from the query's retrieved set.

Runs in DuckDB out of core: the candidate and neighbour files are scanned where needed (views, not
copies), every intermediate is a temp table DuckDB may spill (the `duckdb` config section caps its
buffers). Order is only asked for where the output needs it. The hard
negatives never join every pair with every image of its retrieved set: each query's retrieved set is
gathered and ordered once (one row per query), and each pair filters its query's row.
Hard negatives are drawn in a seeded order per query: draw_key(q) XOR draw_key(n), with a
per-image md5 key. bench/mine.py measures the stage on 50M candidate rows.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import PipelineConfig
from megapairs_ops.db import connect, sql
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import FAILURE_SCHEMA, PAIRS_SCHEMA
from megapairs_ops.storage import atomic_path

__all__ = ["build_pairs"]

BATCH_ROWS = 1 << 16


def _connect(cfg: PipelineConfig, layout: RunLayout):
    return connect(
        cfg, layout, "pairs",
        # No result of this stage depends on scan order; final outputs say ORDER BY.
        preserve_insertion_order=False,
        # DuckDB rewrites "row_number() <= n per partition" into a top-n aggregate whose state
        # cannot spill (out of memory at a few million queries); the window operator spills.
        disabled_optimizers="top_n_window_elimination",
    )


def build_pairs(cfg: PipelineConfig, layout: RunLayout) -> dict:
    names = [e.name for e in cfg.encoders]
    cand_paths = [str(layout.candidates(n)) for n in names]
    neigh_paths = [str(layout.neighbours(n)) for n in names]
    n_neg = cfg.mining.n_hard_negatives
    hamming = cfg.pairs.near_duplicate_hamming
    seed = str(cfg.seed)

    con = _connect(cfg, layout)
    seconds: dict[str, float] = {}

    def run(name: str, params: dict | None = None):
        t0 = time.perf_counter()
        result = con.execute(sql(name), params or {})
        seconds[name] = round(time.perf_counter() - t0, 2)
        return result

    try:
        con.register("encoder_files", pa.table({"encoder": names + names, "path": cand_paths + neigh_paths}))
        con.register("bands", pa.table({
            "encoder": names,
            "lo": [e.band[0] for e in cfg.encoders],
            "hi": [e.band[1] for e in cfg.encoders],
        }))
        run("pairs_inputs", {"candidates": cand_paths, "neighbours": neigh_paths, "images": str(layout.images),
                             "max_hamming": hamming})
        run("load_candidates")
        run("load_neighbours")
        run("load_image_hashes", {"seed": seed})
        run("union_candidates_per_pair")
        run("pairs_without_near_duplicates")
        run("cap_pairs_per_query", {"cap": cfg.pairs.max_pairs_per_query})
        run("hard_negative_pools")
        run("hard_negatives_per_pair", {"max_hamming": hamming})
        cand_rows, union_pairs, after_dedup, after_cap = run("pair_funnel_counts").fetchone()
        by_views = {int(n): int(c) for n, c in run("pairs_by_encoder_count").fetchall()}
        t0 = time.perf_counter()
        pairs_out = _write(con, sql("pairs_with_hard_negatives"), {"n": n_neg}, PAIRS_SCHEMA, layout.pairs)
        short = _write(con, sql("pairs_short_of_hard_negatives"), {"n": n_neg}, FAILURE_SCHEMA,
                       layout.failures_part("pairs"))
        seconds["write_outputs"] = round(time.perf_counter() - t0, 2)
    finally:
        con.close()
    near_duplicates, over_cap = int(union_pairs - after_dedup), int(after_dedup - after_cap)
    return {
        "candidate_rows": int(cand_rows),
        "union_pairs": int(union_pairs),
        "near_duplicates_dropped": near_duplicates,
        "over_query_cap_dropped": over_cap,
        "short_of_hard_negatives": short,
        # Every (query, target) the stage did not turn into a pair, by why (the report's funnel).
        "dropped_by_reason": {
            "near_duplicate_of_query": near_duplicates,
            "over_query_cap": over_cap,
            "insufficient_hard_negatives": short,
        },
        "pairs": pairs_out,
        "pairs_by_number_of_encoders": by_views,
        "step_seconds": seconds,
    }


def _write(con, query: str, params: dict, schema: pa.Schema, path) -> int:
    """Stream a query's result into a Parquet file (atomically); returns the row count."""
    rows = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in con.sql(query, params=params).to_arrow_reader(BATCH_ROWS):
            table = pa.Table.from_batches([batch]).cast(schema)
            writer.write_table(table)
            rows += table.num_rows
    return rows
