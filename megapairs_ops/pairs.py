"""Pairs: union of every encoder's candidates into one row per ordered (query, target), near-duplicate
drop, a per-query cap, and hard negatives from the query's retrieved set. Runs in DuckDB so it can
spill to disk instead of needing the candidate set in memory."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from .config import PipelineConfig
from .sqlfiles import sql
from .storage import FAILURE_SCHEMA, RunLayout, atomic_path, write_problem_rows


PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("q_id", pa.string()),
        ("t_id", pa.string()),
        ("encoders", pa.list_(pa.string())),
        ("sims", pa.list_(pa.float32())),
        ("max_sim", pa.float32()),
        ("hn_ids", pa.list_(pa.string())),
    ]
)


def _connect(cfg: PipelineConfig, layout: RunLayout):
    import duckdb

    spill = layout.root / "tmp" / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"memory_limit": cfg.pairs.memory_limit, "temp_directory": str(spill)})
    return con


def build_pairs(cfg: PipelineConfig, layout: RunLayout) -> dict:
    names = [e.name for e in cfg.encoders]
    cand_paths = [str(layout.candidates(n)) for n in names]
    neigh_paths = [str(layout.neighbours(n)) for n in names]
    n_neg = cfg.mining.n_hard_negatives
    hamming = cfg.pairs.near_duplicate_hamming

    con = _connect(cfg, layout)
    try:
        files = pa.table(
            {"encoder": names + names, "path": cand_paths + neigh_paths},
        )
        bands = pa.table(
            {
                "encoder": names,
                "lo": [e.band[0] for e in cfg.encoders],
                "hi": [e.band[1] for e in cfg.encoders],
            }
        )
        con.register("encoder_files", files)
        con.register("bands", bands)
        con.execute(sql("load_candidates"), {"paths": cand_paths})
        con.execute(sql("load_neighbours"), {"paths": neigh_paths})
        con.execute(sql("load_image_hashes"), {"path": str(layout.images)})
        con.execute(sql("union_candidates_per_pair"))
        con.execute(sql("pairs_without_near_duplicates"), {"max_hamming": hamming})
        con.execute(sql("cap_pairs_per_query"), {"cap": cfg.pairs.max_pairs_per_query})
        con.execute(sql("hard_negatives_per_pair"), {"seed": str(cfg.seed), "max_hamming": hamming})

        cand_rows, union_pairs, after_dedup, after_cap = con.execute(sql("pair_funnel_counts")).fetchone()
        by_views = {int(n): int(c) for n, c in con.execute(sql("pairs_by_encoder_count")).fetchall()}

        pairs_out = 0
        with atomic_path(layout.pairs) as tmp, pq.ParquetWriter(tmp, PAIRS_SCHEMA, compression="zstd") as w:
            reader = con.sql(sql("pairs_with_hard_negatives"), params={"n": n_neg}).to_arrow_reader(65536)
            for batch in reader:
                table = pa.Table.from_batches([batch]).cast(PAIRS_SCHEMA)
                w.write_table(table)
                pairs_out += table.num_rows

        short = con.execute(sql("pairs_short_of_hard_negatives"), {"n": n_neg}).fetchall()
    finally:
        con.close()

    write_problem_rows(
        [
            {
                "pair_id": pid,
                "q_id": q,
                "t_id": t,
                "stage": "pairs",
                "reason": "insufficient_hard_negatives",
                "detail": f"the query's retrieved set offers {avail} eligible negatives, {n_neg} needed",
                "attempts": 0,
            }
            for pid, q, t, avail in short
        ],
        FAILURE_SCHEMA,
        layout.failures_part("pairs"),
    )
    return {
        "candidate_rows": int(cand_rows),
        "union_pairs": int(union_pairs),
        "near_duplicates_dropped": int(union_pairs - after_dedup),
        "over_query_cap_dropped": int(after_dedup - after_cap),
        "short_of_hard_negatives": len(short),
        "pairs": pairs_out,
        "pairs_by_number_of_encoders": by_views,
    }
