"""Embed's finalize: an encoder's committed shards streamed into its output files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import EncoderConfig, PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import EMBEDDING_IDS_SCHEMA, QUARANTINE_SCHEMA
from megapairs_ops.stages.embed.encoders import build_encoder
from megapairs_ops.stages.embed.plan import encoder_work, load_shard_plan, shard_file
from megapairs_ops.storage import atomic_path, write_problem_rows


def finalize_embed(cfg: PipelineConfig, layout: RunLayout, encoder_name: str) -> dict[str, Any]:
    """Stream the encoder's committed shards into vectors.npy / ids.parquet / its quarantine
    part (bounded memory); returns the stage's stats. ItemsNotDone while a shard is missing."""
    enc = cfg.encoder(encoder_name)
    stage = f"embed-{encoder_name}"
    work = encoder_work(layout, enc.name)
    statuses = work.require_all()
    plan = load_shard_plan(layout, (work.plan() or {})["shard_plan"])
    identities = {s["identity"] for s in statuses}
    if len(identities) > 1:
        raise RuntimeError(
            f"{stage}: shards were embedded under {len(identities)} different encoder identities (weights, "
            "dtype or preprocessing changed between tasks, e.g. CPU and GPU workers); force the stage to redo it"
        )
    dims = {s["dim"] for s in statuses}
    dim = dims.pop() if dims else _dim_without_shards(cfg, layout, enc)
    total = sum(s["embedded"] for s in statuses)
    problems: list[dict[str, str]] = []
    with (
        atomic_path(layout.embedding_vectors(enc.name)) as vec_tmp,
        atomic_path(layout.embedding_ids(enc.name)) as ids_tmp,
    ):
        if total == 0:
            with vec_tmp.open("wb") as fh:
                np.save(fh, np.zeros((0, dim), np.float32))
            out = None
        else:
            # open_memmap writes exactly the given file name (np.save would append ".npy").
            out = np.lib.format.open_memmap(vec_tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        with pq.ParquetWriter(ids_tmp, EMBEDDING_IDS_SCHEMA, compression="zstd") as writer:
            row = 0
            for s in range(plan.n_shards):
                with np.load(shard_file(layout, enc.name, s)) as part:
                    vectors = part["vectors"]
                    if out is not None and len(vectors):
                        out[row : row + len(vectors)] = vectors
                    row += len(vectors)
                    writer.write_table(pa.table({"image_id": part["ids"].tolist()}, schema=EMBEDDING_IDS_SCHEMA))
                    quarantined = zip(*(part[key].tolist() for key in ("q_path", "q_reason", "q_detail")))
                    problems += [{"path": p, "reason": r, "detail": d, "stage": stage} for p, r, d in quarantined]
        if out is not None:
            out.flush()
            del out
    write_problem_rows(problems, QUARANTINE_SCHEMA, layout.quarantine_part(stage))
    stats: dict[str, Any] = {
        "images_in": plan.n_rows,
        "embedded": total,
        "quarantined": len(problems),
        "dim": dim,
        "encoder_kind": enc.kind,
        "model": enc.model,
        "reused": sum(s.get("reused", 0) for s in statuses),
        "computed": sum(s.get("computed", 0) for s in statuses),
        "shards": plan.n_shards,
        "identity": identities.pop() if identities else None,
    }
    if enc.kind == "precomputed":
        from megapairs_ops.stages.embed.from_files import precomputed_mapping

        _, _, source_stats = precomputed_mapping(cfg, layout, plan, enc)
        stats.update({k: v for k, v in source_stats.items() if k.startswith("precomputed_")})
    return stats


def _dim_without_shards(cfg: PipelineConfig, layout: RunLayout, enc: EncoderConfig) -> int:
    """An empty corpus still gets a (0, dim) vectors.npy: the dim comes from the encoder itself."""
    if enc.kind == "precomputed":
        from megapairs_ops.stages.embed.encoders.precomputed import inspect_source

        return inspect_source(enc).dim
    return build_encoder(enc).dim
