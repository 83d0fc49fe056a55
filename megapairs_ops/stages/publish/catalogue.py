"""The catalogue of published pairs and dataset versions under one output root (a DuckDB file).

Every publication becomes a dataset version whose manifest names its parent. A run over a grown
corpus asks the catalogue which of its pairs were already published with the same annotators and
prompt version (stages/annotate/reuse.py), and reuses those annotations.
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from megapairs_ops.config import PipelineConfig, StepConfig
from megapairs_ops.db import connect, sql
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import load_status, write_json

TEMPLATE_MODEL = "template-baseline-v1"


def catalogue_path(cfg: PipelineConfig, layout: RunLayout) -> Path:
    """Default: beside the run partitions, so every run under one output root shares it."""
    return Path(cfg.publish.catalogue).expanduser() if cfg.publish.catalogue else layout.default_catalogue


def annotator_key(step: StepConfig) -> str:
    return f"{step.backend}:{step.model or TEMPLATE_MODEL}"


@contextmanager
def open_catalogue(cfg: PipelineConfig, path: Path) -> Iterator:
    """An exclusive connection: DuckDB allows one writing process per file, and publications of
    concurrent runs must not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        con = connect(cfg, None, "catalogue", database=path)
        try:
            con.execute(sql("catalogue_schema"))
            yield con
        finally:
            con.close()


def reusable_annotations(cfg: PipelineConfig, layout: RunLayout, schema: pa.Schema) -> pa.Table:
    path = catalogue_path(cfg, layout)
    if not path.exists():
        return schema.empty_table()
    a = cfg.annotate
    with open_catalogue(cfg, path) as con:
        table = con.sql(
            sql("catalogue_reusable_annotations"),
            params={
                "pairs": str(layout.pairs),
                "describe_key": annotator_key(a.describe),
                "instruct_key": annotator_key(a.instruct),
                "prompt_version": a.prompt_version,
            },
        ).to_arrow_table()
    return table.cast(schema)


def record_version(cfg: PipelineConfig, layout: RunLayout, run_id: str) -> dict:
    """Catalogue a published run as version `<run dir name>` and write its manifest.json."""
    version = layout.version
    triplets = str(layout.triplets_dir / "part-*.parquet")
    annotate_stats = load_status(layout, "annotate") or {}
    with open_catalogue(cfg, catalogue_path(cfg, layout)) as con:
        known = con.execute(sql("catalogue_version"), {"version": version}).fetchone()
        if known:  # a re-run of a published version keeps its place in the lineage
            parent, published_at = known[0], known[1].strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            row = con.execute(sql("catalogue_latest_other_version"), {"version": version}).fetchone()
            parent, published_at = (row[0] if row else None), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        added = con.execute(sql("catalogue_new_pairs_of_version"), {"triplets": triplets, "version": version}).fetchone()[0]
        total = con.execute(sql("count_triplets"), {"triplets": triplets}).fetchone()[0]
        manifest = {
            "version": version,
            "parent": parent,
            "run_id": run_id,
            "run_dir": str(layout.root),
            "published_at": published_at,
            "triplets": int(total),
            "added": int(added),
            "carried_over": int(total - added),
            "annotations_reused": int(annotate_stats.get("reused", 0) or 0),
            "models": {
                "encoders": [
                    {"name": e.name, "kind": e.kind, "model": e.model, "revision": e.revision} for e in cfg.encoders
                ],
                "describe": annotator_key(cfg.annotate.describe),
                "instruct": annotator_key(cfg.annotate.instruct),
            },
            "prompt_versions": [cfg.annotate.prompt_version],
        }
        con.execute(sql("catalogue_record_pairs"), {"triplets": triplets, "version": version})
        con.execute(
            sql("catalogue_upsert_version"),
            {
                "version": version,
                "parent": parent,
                "run_dir": str(layout.root),
                "run_id": run_id,
                "published_at": published_at,
                "triplets": int(total),
                "added": int(added),
                "manifest": json.dumps(manifest),
            },
        )
    write_json(manifest, layout.manifest)
    return manifest
