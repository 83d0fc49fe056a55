"""Embedding from files: precomputed vectors (clip-retrieval's output, or a .npy with an ids
file) matched to the corpus and read shard by shard like a model's."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from megapairs_ops.config import EncoderConfig, PipelineConfig
from megapairs_ops.db import session_settings
from megapairs_ops.layout import RunLayout
from megapairs_ops.stages.embed.encoders import l2_normalise
from megapairs_ops.stages.embed.plan import ShardPlan, encoder_fingerprint, encoder_work
from megapairs_ops.stages.embed.shards import ShardDone, write_shard
from megapairs_ops.storage import atomic_path, read_json, write_json


def precomputed_mapping(cfg: PipelineConfig, layout: RunLayout, plan: ShardPlan, enc: EncoderConfig):
    """(source files, mapping file, mapping stats): which vector of the source each row of
    images.parquet takes, built once per source and shard plan in the encoder's work dir."""
    from megapairs_ops.stages.embed.encoders import precomputed

    files = precomputed.inspect_source(enc)
    digest = precomputed.source_digest(enc, files)
    path = encoder_work(layout, enc.name).root / f"precomputed-{plan.key}-{digest}.parquet"
    stats_path = path.with_suffix(".json")
    if not stats_path.is_file():
        with atomic_path(path) as tmp:
            stats = precomputed.build_mapping(
                enc, files, layout.images, tmp, plan.shard_size, session_settings(cfg, layout, f"embed-{enc.name}")
            )
        write_json({**stats, "dim": files.dim, "source": digest}, stats_path)
    return files, path, read_json(stats_path)


def run_precomputed(
    cfg: PipelineConfig, layout: RunLayout, plan: ShardPlan, enc: EncoderConfig, shards: list[int], on_shard: ShardDone,
) -> None:
    """Read the vectors of `shards` from the source files, normalised again in float32."""
    from megapairs_ops.stages.embed.encoders.precomputed import VectorReader

    files, mapping, source = precomputed_mapping(cfg, layout, plan, enc)
    reader = VectorReader(files)
    status = {"fingerprint": encoder_fingerprint(cfg, enc), "identity": source["source"], "dim": files.dim}
    for s in shards:
        lo, hi = plan.rows(s)
        found = pq.read_table(mapping, filters=[("row", ">=", lo), ("row", "<", hi)]).to_pydict()
        at = {row - lo: (f, r) for row, f, r in zip(found["row"], found["file"], found["frow"])}
        problems = [
            (row, "no_precomputed_embedding", f"no vector for this image in {enc.precomputed.path}")
            if row not in at
            else (row, "ambiguous_precomputed_key", "this image's key also matches another image's vector")
            for row in range(hi - lo)
            if at.get(row, (-1, 0))[0] < 0
        ]
        rows = np.array([row for row in range(hi - lo) if at.get(row, (-1, 0))[0] >= 0], np.int64)
        raw = reader.gather(np.array([at[r][0] for r in rows], np.int64), np.array([at[r][1] for r in rows], np.int64))
        finite = np.isfinite(raw).all(axis=1)
        nonzero = np.abs(np.where(np.isfinite(raw), raw, 0)).sum(axis=1) > 0
        problems += [(int(r), "non_finite_embedding", "the precomputed vector holds NaN/inf") for r in rows[~finite]]
        problems += [(int(r), "zero_embedding", "the precomputed vector is all zeros") for r in rows[finite & ~nonzero]]
        good = finite & nonzero
        vectors = np.zeros((hi - lo, files.dim), np.float32)
        # clip-retrieval stores float16: normalised again in float32.
        vectors[rows[good]] = l2_normalise(raw[good])
        counts = {"reused": 0, "computed": 0, "read": int(good.sum())}
        written = write_shard(layout, enc.name, s, plan.manifest(s), vectors, rows[good].tolist(), problems,
                              {"digest": plan.digests[s], **status, **counts})
        on_shard(s, {enc.name: written})
