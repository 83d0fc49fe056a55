"""Mining: k nearest neighbours per query image for one encoder, kept when inside the encoder's band.

Exact inner-product search (FAISS IndexFlatIP) on L2-normalised vectors, so inner product is
cosine similarity. Queries stream in batches; both outputs stream to Parquet, so memory holds the
index plus one batch of results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import PipelineConfig
from .storage import RunLayout, atomic_path


CANDIDATE_SCHEMA = pa.schema(
    [("q_id", pa.string()), ("t_id", pa.string()), ("sim", pa.float32()), ("rank", pa.int32())]
)


def _neighbour_batches(vectors: np.ndarray, k: int, batch_size: int):
    """Yield (query_rows, sims, idx) with self-matches removed; k+1 searched so self can be dropped."""
    import faiss

    n, dim = vectors.shape
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    kk = min(k + 1, n)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        sims, idx = index.search(vectors[start:stop], kk)
        rows = np.arange(start, stop)[:, None]
        # A query can tie with an identical vector ahead of itself, so drop self by id, not by position.
        not_self = (idx != rows) & (idx >= 0)
        yield rows[:, 0], sims, idx, not_self


def mine_candidates(cfg: PipelineConfig, encoder_name: str, layout: RunLayout) -> dict:
    enc = cfg.encoder(encoder_name)
    lo, hi = enc.band
    k, cap = cfg.mining.k, cfg.mining.max_targets_per_query
    vectors = np.load(layout.embedding_vectors(encoder_name), mmap_mode="r")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = pq.read_table(layout.embedding_ids(encoder_name), columns=["image_id"]).column(0)
    ids = np.asarray(ids.to_pylist(), dtype=object)
    if len(ids) != len(vectors):
        raise ValueError(
            f"embeddings of '{encoder_name}' are inconsistent: {len(vectors)} vectors but {len(ids)} ids; "
            "delete the encoder's embeddings folder and re-run the embed stage"
        )

    n_neighbours = n_candidates = queries_with_pairs = 0
    sim_hist = np.zeros(20, dtype=np.int64)  # sims of all neighbours, bins over [0, 1]
    with (
        atomic_path(layout.candidates(encoder_name)) as cand_tmp,
        atomic_path(layout.neighbours(encoder_name)) as neigh_tmp,
    ):
        with (
            pq.ParquetWriter(cand_tmp, CANDIDATE_SCHEMA, compression="zstd") as cand_writer,
            pq.ParquetWriter(neigh_tmp, CANDIDATE_SCHEMA, compression="zstd") as neigh_writer,
        ):
            if len(vectors) >= 2:
                for q_rows, sims, idx, keep in _neighbour_batches(vectors, k, cfg.mining.query_batch_size):
                    # Rank among the query's own neighbours (self excluded), 1-based, first k only.
                    rank = np.cumsum(keep, axis=1)
                    keep &= rank <= k
                    q_flat = np.broadcast_to(q_rows[:, None], idx.shape)[keep]
                    t_flat, s_flat, r_flat = idx[keep], sims[keep], rank[keep]
                    neigh = _table(ids, q_flat, t_flat, s_flat, r_flat)
                    neigh_writer.write_table(neigh)
                    n_neighbours += neigh.num_rows
                    sim_hist += np.histogram(np.clip(s_flat, 0, 1), bins=20, range=(0, 1))[0]

                    in_band = keep & (sims > lo) & (sims < hi)
                    # Targets are ordered by similarity already; keep the first `cap` in band per query.
                    in_band &= np.cumsum(in_band, axis=1) <= cap
                    cand = _table(
                        ids,
                        np.broadcast_to(q_rows[:, None], idx.shape)[in_band],
                        idx[in_band],
                        sims[in_band],
                        rank[in_band],
                    )
                    cand_writer.write_table(cand)
                    n_candidates += cand.num_rows
                    queries_with_pairs += int(in_band.any(axis=1).sum())
    return {
        "queries": int(len(ids)),
        "neighbours": n_neighbours,
        "candidates": n_candidates,
        "queries_with_candidates": queries_with_pairs,
        "band": [lo, hi],
        "k": k,
        "index": "IndexFlatIP",
        "sim_histogram_0_1_by_0_05": sim_hist.tolist(),
    }


def _table(ids: np.ndarray, q: np.ndarray, t: np.ndarray, sim: np.ndarray, rank: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "q_id": pa.array(ids[q], pa.string()),
            "t_id": pa.array(ids[t], pa.string()),
            "sim": pa.array(sim.astype(np.float32)),
            "rank": pa.array(rank.astype(np.int32)),
        },
        schema=CANDIDATE_SCHEMA,
    )


def read_candidates(path: Path) -> pa.Table:
    return pq.read_table(path, schema=CANDIDATE_SCHEMA)
