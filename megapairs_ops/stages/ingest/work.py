"""Ingest's work: plan ranges of the corpus, verify each range in a work item, merge the items'
parts and collapse exact duplicates across the corpus (Polars)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.context import corpus_signature
from megapairs_ops.schemas import IMAGES_SCHEMA, INGEST_PART_SCHEMA, QUARANTINE_SCHEMA
from megapairs_ops.storage import WorkDir, write_parquet, write_problem_rows

from .readers import (
    IMAGE_EXTENSIONS,
    IngestError,
    Item,
    _printable,
    detect_reader,
    folder_items,
    list_folder,
    manifest_rows,
    read_manifest,
    read_webdataset,
)
from .verify import verify_all

_LISTING = "listing.parquet"


def plan_ingest(cfg: PipelineConfig, corpus: Path, work: WorkDir) -> list[dict[str, Any]]:
    """Work items over the corpus: slices of the folder listing or ranges of manifest rows of
    `ingest.shard_size` entries, or one item per tar shard. Listing happens once per execution."""
    corpus = Path(os.path.abspath(corpus.expanduser()))
    fingerprint = cfg.section_fingerprint("ingest-work", cfg.ingest, str(corpus), corpus_signature(corpus))
    plan = work.matches(fingerprint)
    if plan is not None:
        return plan["specs"]
    try:
        kind, inputs = detect_reader(corpus, cfg.ingest.reader)
        problems: list[Item] = []
        listing: list[str] = []
        if kind == "folder":
            listing, problems = list_folder(inputs[0])
            n = len(listing)
        elif kind == "manifest":
            n = manifest_rows(inputs[0], cfg.ingest)
    except OSError as exc:
        raise IngestError(f"{corpus}: cannot read the corpus: {exc.strerror or exc}") from None
    size = cfg.ingest.shard_size
    if kind == "webdataset":
        specs = [{"id": f"tar-{i:06d}", "shard": str(p)} for i, p in enumerate(inputs)]
    else:
        prefix = "files" if kind == "folder" else "rows"
        specs = [{"id": f"{prefix}-{a:09d}-{min(a + size, n):09d}", "start": a, "stop": min(a + size, n)}
                 for a in range(0, n, size)]

    def write_listing(root: Path) -> None:
        if kind == "folder":  # names as bytes: a file name need not be valid UTF-8
            pq.write_table(pa.table({"path": pa.array([os.fsencode(p) for p in listing], pa.binary())}),
                           root / _LISTING)

    work.start(
        fingerprint, [s["id"] for s in specs], write_listing, specs=specs, reader=kind, corpus=str(corpus),
        inputs=[str(p) for p in inputs],
        problems=[{"path": i.path, "reason": i.problem[0], "detail": i.problem[1]} for i in problems if i.problem],
    )
    return specs


def _items_of(plan: dict[str, Any], spec: dict[str, Any], cfg: PipelineConfig, work: WorkDir) -> Iterator[Item]:
    if plan["reader"] == "webdataset":
        return read_webdataset(spec["shard"], cfg.ingest)
    if plan["reader"] == "manifest":
        return read_manifest(Path(plan["inputs"][0]), cfg.ingest, spec["start"], spec["stop"])
    names = pq.read_table(work.root / _LISTING).column("path").slice(spec["start"], spec["stop"] - spec["start"])
    return folder_items((os.fsdecode(p) for p in names.to_pylist()), cfg.ingest)


def run_ingest_item(cfg: PipelineConfig, work: WorkDir, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Verify the item's entries (`threads` at a time) and write its two parts: usable images and
    quarantined inputs. Returns the item's counts."""
    plan = work.plan()
    if plan is None:
        raise IngestError(f"{work.root}: ingest was not planned; plan the stage first")
    images: list[tuple] = []
    quarantine: list[dict[str, str]] = []
    for ok, payload in verify_all(_items_of(plan, spec, cfg, work), cfg.ingest, threads):
        if ok:
            images.append(payload)
        else:
            path, reason, detail = payload
            quarantine.append({"path": path, "reason": reason, "detail": _printable(detail), "stage": "ingest"})
    columns = {name: list(col) for name, col in zip(INGEST_PART_SCHEMA.names, zip(*images))} if images else None
    table = pa.table(columns, schema=INGEST_PART_SCHEMA) if columns else INGEST_PART_SCHEMA.empty_table()
    write_problem_rows(quarantine, QUARANTINE_SCHEMA, work.part(spec["id"], "quarantine"))
    write_parquet(table, work.part(spec["id"], "images"))
    return {"seen": len(images) + len(quarantine), "usable": len(images), "quarantined": len(quarantine)}


def finalize_ingest(cfg: PipelineConfig, work: WorkDir, layout: RunLayout) -> dict[str, Any]:
    """Merge the parts: one row per distinct image (exact copies collapse into the first path,
    the others listed in duplicate_paths), sorted by image_id; the quarantine part, sorted."""
    plan = work.plan() or {}
    items = work.require_all()
    problems = [{**p, "stage": "ingest"} for p in plan.get("problems", [])]
    seen = sum(s["seen"] for s in items) + len(problems)
    quarantine = pa.concat_tables(
        [pq.read_table(work.part(s["item"], "quarantine"), schema=QUARANTINE_SCHEMA) for s in items]
        + [pa.Table.from_pylist(problems, schema=QUARANTINE_SCHEMA)]
    ).sort_by([("path", "ascending"), ("reason", "ascending"), ("detail", "ascending")])
    write_parquet(quarantine, layout.quarantine_part("ingest"))
    corpus = plan.get("corpus", "")
    if seen == 0:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise IngestError(f"{corpus}: no images found by the {plan.get('reader')} reader (looked for {exts})")
    usable = sum(s["usable"] for s in items)
    if not usable:
        raise IngestError(f"{corpus}: none of the {seen} items is usable; reasons are in {layout.quarantine_part('ingest')}")
    images = _collapse_duplicates([work.part(s["item"], "images") for s in items if s["usable"]])
    write_parquet(images, layout.images)
    reasons = Counter(quarantine.column("reason").to_pylist())
    return {
        "reader": plan.get("reader"),
        "items_seen": seen,
        "images": images.num_rows,
        "quarantined": quarantine.num_rows,
        "duplicates_collapsed": usable - images.num_rows,
        "quarantine_by_reason": dict(sorted(reasons.items())),
        "work_items": len(items),
    }


def _collapse_duplicates(parts: list[Path]) -> pa.Table:
    """Exact copies (same sha256) are one image: the first by (path, caption) keeps its row, the
    other paths go to duplicate_paths. Reads only the parts; the order items ran in never matters."""
    import polars as pl

    keep = [c for c in INGEST_PART_SCHEMA.names if c != "sha256"]
    images = (
        pl.scan_parquet([str(p) for p in parts])
        .sort(["sha256", "path", "caption"])
        .group_by("sha256", maintain_order=True)
        .agg(
            *[pl.col(c).first() for c in keep],
            pl.col("path").filter(pl.col("path") != pl.col("path").first()).unique().sort().alias("duplicate_paths"),
        )
        .with_columns(pl.col("sha256").str.slice(0, 16).alias("image_id"))
        .sort("image_id")
        .collect()
    )
    return images.to_arrow().select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA)
