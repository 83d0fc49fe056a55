"""Publish: triplets in the released record format plus provenance, a JSONL export, and the merged
quarantine and failure tables of the whole run. Curators' rejections (curation.py) are applied
here, so the next publish after a curator edits the rejects file leaves those pairs out."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import PipelineConfig
from megapairs_ops.stages.publish.curation import apply_curation, rejects_path
from megapairs_ops.db import connect, sql
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import FAILURE_SCHEMA, QUARANTINE_SCHEMA, RELEASED_FIELDS, TRIPLET_SCHEMA
from megapairs_ops.storage import atomic_dir, atomic_path, merge_parts, write_json



def run_config_path(layout: RunLayout) -> Path:
    """The resolved config of the run's last publish, so `megapairs report RUN_DIR` needs no
    --config."""
    return layout.run_config


def write_run_config(cfg: PipelineConfig, layout: RunLayout) -> None:
    data = cfg.model_dump(mode="json")
    path = rejects_path(cfg)
    data["curation"]["rejects_file"] = str(path) if path else None  # valid from any directory
    write_json(data, run_config_path(layout))


def publish_triplets(cfg: PipelineConfig, layout: RunLayout, run_id: str) -> dict:
    write_run_config(cfg, layout)
    params = {
        "pairs": str(layout.pairs),
        "images": str(layout.images),
        "annotations": str(layout.annotations),
    }
    rows = parts = 0
    con = connect(cfg, layout, "publish")
    try:
        curation = apply_curation(con, cfg, layout)
        con.execute(sql("hard_negative_paths"), {"pairs": params["pairs"], "images": params["images"]})
        reader = con.sql(
            sql("triplets_released_format"), params={**params, "run_id": run_id}
        ).to_arrow_reader(cfg.publish.part_rows)
        with atomic_dir(layout.triplets_dir) as tmp_dir, atomic_path(layout.triplets_jsonl) as jsonl_tmp:
            with jsonl_tmp.open("w", encoding="utf-8") as jsonl:
                for batch in _rebatch(reader, cfg.publish.part_rows):
                    table = pa.Table.from_batches([batch]).cast(TRIPLET_SCHEMA)
                    pq.write_table(table, tmp_dir / f"part-{parts:05d}.parquet", compression="zstd")
                    parts += 1
                    rows += table.num_rows
                    if cfg.publish.jsonl:
                        for rec in table.select(["pair_id", *RELEASED_FIELDS]).to_pylist():
                            jsonl.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if parts == 0:
                pq.write_table(TRIPLET_SCHEMA.empty_table(), tmp_dir / "part-00000.parquet")
                parts = 1
    finally:
        con.close()

    quarantined = merge_parts(layout.quarantine_dir, QUARANTINE_SCHEMA, layout.quarantine)
    failed = merge_parts(layout.failures_dir, FAILURE_SCHEMA, layout.failures)
    return {"triplets": rows, "parts": parts, "quarantined": quarantined, "failed": failed, "run_id": run_id,
            "curation": curation}


def _rebatch(reader: pa.RecordBatchReader, size: int):
    """DuckDB hands out batches of its own vector size; regroup them into parts of `size` rows."""
    buf: list[pa.RecordBatch] = []
    n = 0
    for batch in reader:
        buf.append(batch)
        n += batch.num_rows
        while n >= size:
            table = pa.Table.from_batches(buf).combine_chunks()
            yield table.slice(0, size).to_batches(max_chunksize=size)[0]
            rest = table.slice(size)
            buf = rest.to_batches() if rest.num_rows else []
            n = rest.num_rows
    if n:
        yield pa.Table.from_batches(buf).combine_chunks().to_batches(max_chunksize=n)[0]
