"""Ingest: read a captioned corpus, verify every item, collapse exact duplicates.

- readers.py: the folder, manifest and WebDataset readers, each over a range of the corpus;
- verify.py: one item's bytes, hashes, decode and caption, every problem a quarantine reason;
- work.py: the plan (ranges of the corpus), one work item, and the merge (Polars dedup).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.stage import Device, Resources, Stage

if TYPE_CHECKING:
    from megapairs_ops.config import PipelineConfig

__all__ = ["IngestStage", "ingest_corpus"]


class IngestStage(Stage):
    name = "ingest"
    gate = "ingest"
    rows = ("items_seen", "images")

    def result_config(self, ctx, encoder: str | None) -> list[Any]:
        return [ctx.cfg.ingest, str(ctx.corpus), ctx.corpus_signature()]

    @classmethod
    def task_resources(cls, device: Device) -> Resources:
        return Resources(processes=True)  # decoding and hashing: CPU-bound, one process per core

    def per_task(self, cfg: PipelineConfig) -> int:
        return cfg.ingest.shards_per_task

    def plan(self, ctx, encoders: list[str | None], device: Device | None = None) -> list[dict[str, Any]]:
        from .work import plan_ingest

        return plan_ingest(ctx.cfg, ctx.corpus, self.work(ctx.layout, None))

    def run_item(self, ctx, item: dict[str, Any]) -> dict[str, Any]:
        from megapairs_ops.pipeline.executor import cpu_share

        from .work import run_ingest_item

        return run_ingest_item(ctx.cfg, self.work(ctx.layout, None), item, cpu_share())

    def finalize(self, ctx, encoder: str | None) -> dict[str, Any]:
        from .work import finalize_ingest

        return finalize_ingest(ctx.cfg, self.work(ctx.layout, None), ctx.layout)

    def outputs(self, layout: RunLayout, encoder: str | None) -> list[Path]:
        return [layout.images.parent, layout.quarantine_part("ingest"), layout.work_dir("ingest")]


def ingest_corpus(cfg: PipelineConfig, corpus: str | Path, layout: RunLayout) -> dict[str, Any]:
    """The whole stage in this process, without status records (tests, notebooks)."""
    from megapairs_ops.pipeline.runner import run_work_inline

    return run_work_inline(IngestStage(), cfg, layout, corpus=Path(os.path.abspath(Path(corpus).expanduser())))[0]
