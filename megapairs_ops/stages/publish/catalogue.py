"""The catalogue of published pairs and dataset versions under one output root (a DuckDB file).

A scheduled run over a grown corpus asks the catalogue which of its pairs were already published
with the same annotators and prompt version, and reuses those annotations instead of paying the
models again. Every publication becomes a dataset version whose manifest names its parent.
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
from megapairs_ops.sqlfiles import sql
from megapairs_ops.storage import RunLayout, load_status, write_json

TEMPLATE_MODEL = "template-baseline-v1"


def catalogue_path(cfg: PipelineConfig, layout: RunLayout) -> Path:
    """Default: beside the run partitions, so every run under one output root shares it."""
    return Path(cfg.publish.catalogue).expanduser() if cfg.publish.catalogue else layout.root.parent / "catalogue.duckdb"


def annotator_key(step: StepConfig) -> str:
    return f"{step.backend}:{step.model or TEMPLATE_MODEL}"


@contextmanager
def open_catalogue(path: Path) -> Iterator:
    """An exclusive connection: DuckDB allows one writing process per file, and publications of
    concurrent runs must not interleave."""
    import duckdb

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        con = duckdb.connect(str(path))
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
    with open_catalogue(path) as con:
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
    version = layout.root.name
    triplets = str(layout.triplets_dir / "part-*.parquet")
    annotate_stats = load_status(layout, "annotate") or {}
    with open_catalogue(catalogue_path(cfg, layout)) as con:
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
    write_json(manifest, layout.root / "manifest.json")
    return manifest


class _ToAnnotateLayout(RunLayout):
    """The run layout with `pairs` and `annotations` redirected, so the annotate stage sees only
    the pairs the catalogue cannot answer, and writes beside the final annotations."""

    @property
    def pairs(self) -> Path:
        return self.root / "annotations" / "to_annotate" / "pairs.parquet"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations" / "to_annotate" / "annotations.parquet"


def _split_files(layout: RunLayout) -> tuple[Path, Path]:
    folder = layout.root / "annotations" / "to_annotate"
    return folder / "split.json", folder / "reused.parquet"


def _split_key(cfg: PipelineConfig, layout: RunLayout) -> dict:
    from megapairs_ops.stages.annotate.work import stage_execution

    st = layout.pairs.stat()
    a = cfg.annotate
    return {
        "pairs": [str(layout.pairs), st.st_size, st.st_mtime_ns],
        "catalogue": str(catalogue_path(cfg, layout)),
        "describe_key": annotator_key(a.describe),
        "instruct_key": annotator_key(a.instruct),
        "prompt_version": a.prompt_version,
        "execution": stage_execution(cfg, layout),
    }


def split_for_reuse(cfg: PipelineConfig, layout: RunLayout) -> dict:
    """Split the run's pairs into those whose annotations the catalogue already published (same
    pair, annotators and prompt version) and those to annotate. The split is kept for the stage
    execution under way, so the work items planned from it and the final merge see exactly the
    same reused set even if the catalogue changes in between (another run publishing). Returns
    {pairs_in, reused, pairs_to_annotate, ...}; the pairs to annotate are in
    annotation_layout(layout, split).pairs."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from megapairs_ops.stages.annotate.work import ANNOTATION_SCHEMA
    from megapairs_ops.storage import read_json, write_parquet

    split_path, reused_path = _split_files(layout)
    key = _split_key(cfg, layout)
    inner = _ToAnnotateLayout(layout.root)
    if split_path.is_file():
        try:
            split = read_json(split_path)
        except (OSError, ValueError):
            split = {}
        if split.get("key") == key and (split.get("reused") == 0 or (inner.pairs.is_file() and reused_path.is_file())):
            return split
    split_path.unlink(missing_ok=True)

    reused, rechecked_out = _passing_current_checks(cfg, reusable_annotations(cfg, layout, ANNOTATION_SCHEMA))
    if reused.num_rows == 0:
        pairs_in = pq.ParquetFile(layout.pairs).metadata.num_rows
        split = {"key": key, "pairs_in": pairs_in, "reused": 0, "pairs_to_annotate": pairs_in,
                 "reuse_failed_checks": rechecked_out}
    else:
        pairs = pq.read_table(layout.pairs)
        todo = pairs.filter(pc.invert(pc.is_in(pairs.column("pair_id"), value_set=reused.column("pair_id"))))
        write_parquet(todo, inner.pairs)
        write_parquet(reused, reused_path)
        split = {"key": key, "pairs_in": pairs.num_rows, "reused": reused.num_rows, "pairs_to_annotate": todo.num_rows,
                 "reuse_failed_checks": rechecked_out}
    write_json(split, split_path)  # last: the split is valid once its files are all there
    return split


def _passing_current_checks(cfg: PipelineConfig, annotations: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """The published annotations that still pass the current output checks, and how many did not,
    by reason: those are annotated anew instead of being published again."""
    from collections import Counter

    from megapairs_ops.stages.annotate.checks import TextRules, check_annotation

    rules = TextRules.from_config(cfg.annotate.checks)
    columns = (annotations.column(c).to_pylist() for c in ("description", "instructions", "word_num"))
    reasons = [check_annotation(d, i or [], w or 0, cfg.annotate, rules) for d, i, w in zip(*columns)]
    failed = Counter(r for r in reasons if r)
    if not failed:
        return annotations, {}
    return annotations.filter(pa.array([not r for r in reasons])), dict(sorted(failed.items()))


def annotation_layout(layout: RunLayout, split: dict) -> RunLayout:
    """Where the annotate work of a split reads its pairs and writes its annotations."""
    return _ToAnnotateLayout(layout.root) if split["reused"] else layout


def plan_annotate_with_reuse(cfg: PipelineConfig, layout: RunLayout) -> list[dict]:
    """The annotate stage's work items after the catalogue reuse split (see split_for_reuse):
    only pairs the catalogue cannot answer are planned. Run each with run_annotate_item, then
    annotate_with_reuse finds them done and finalizes."""
    from megapairs_ops.stages.annotate.work import plan_annotate_work

    split = split_for_reuse(cfg, layout)
    source = "to_annotate" if split["reused"] else "pairs"
    return [{**item, "source": source} for item in plan_annotate_work(cfg, annotation_layout(layout, split))]


def run_annotate_item(cfg: PipelineConfig, layout: RunLayout, item: dict, run_id: str = "", progress: bool = False) -> dict:
    """One work item of plan_annotate_with_reuse (idempotent, see run_annotate_work)."""
    from megapairs_ops.stages.annotate.work import run_annotate_work

    target = _ToAnnotateLayout(layout.root) if item.get("source") == "to_annotate" else layout
    return run_annotate_work(cfg, target, item, run_id, progress=progress)


def annotate_with_reuse(cfg: PipelineConfig, layout: RunLayout, run_id: str, progress: bool = False) -> dict:
    """Annotate the run's pairs, reusing every annotation the catalogue already published for the
    same pair, annotators and prompt version: those pairs are never sent to a model again. Work
    items already run (e.g. by mapped Airflow tasks after plan_annotate_with_reuse) are not run
    again; then the outputs are finalized and merged with the reused annotations."""
    import pyarrow.parquet as pq

    from megapairs_ops.stages.annotate.work import ANNOTATION_OUTPUT_SCHEMA, annotate_pairs
    from megapairs_ops.storage import write_parquet

    split = split_for_reuse(cfg, layout)
    inner = annotation_layout(layout, split)
    stats = annotate_pairs(cfg, inner, run_id, progress=progress)
    # Published annotations that fail today's checks are asked again, never published again.
    stats["reuse_failed_checks"] = split.get("reuse_failed_checks", {})
    if not split["reused"]:
        stats["reused"] = 0
        return stats

    fresh = pq.read_table(inner.annotations)
    reused = pq.read_table(_split_files(layout)[1])
    merged = pa.concat_tables(
        [fresh.cast(ANNOTATION_OUTPUT_SCHEMA), pa.Table.from_pylist(reused.to_pylist(), schema=ANNOTATION_OUTPUT_SCHEMA)]
    ).sort_by("pair_id")
    write_parquet(merged, layout.annotations)
    stats.update(
        pairs_in=split["pairs_in"],
        accepted=merged.num_rows,
        reused=split["reused"],
        pairs_annotated=split["pairs_to_annotate"],
    )
    return stats
