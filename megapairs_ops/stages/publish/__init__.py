"""Publish: the triplets in the released record format, a dataset version in the catalogue.

- triplets.py: the released format plus provenance, the JSONL export, the merged quarantine and
  failure tables;
- curation.py: the curators' rejects (pairs and images withheld, rejected negatives replaced);
- catalogue.py: published pairs and dataset versions under one output root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.stage import Device, Stage, item_result

__all__ = ["PublishStage"]


class PublishStage(Stage):
    """One work item: the whole release, streamed out of DuckDB in parts."""

    name = "publish"
    upstream = ("annotate",)
    gate = "triplets"
    rows = ("annotated", "triplets")

    def result_config(self, ctx, encoder: str | None) -> list[Any]:
        from .curation import rejects_fingerprint

        cfg = ctx.cfg
        # Editing the curators' rejects file or a gate threshold re-publishes.
        return [cfg.publish, cfg.validation, cfg.gates, rejects_fingerprint(cfg)]

    def plan(self, ctx, encoders: list[str | None], device: Device | None = None) -> list[dict[str, Any]]:
        from megapairs_ops.storage import file_stamps

        lay = ctx.layout
        inputs = file_stamps(lay.annotations, lay.pairs, lay.images)
        fingerprint = ctx.cfg.section_fingerprint("publish-work", *self.result_config(ctx, None), inputs)
        self.work(lay, None).start(fingerprint, ["publish"])
        return [{"id": "publish"}]

    def run_item(self, ctx, item: dict[str, Any]) -> dict[str, Any]:
        from megapairs_ops.storage import load_status

        from .triplets import publish_triplets

        stats = publish_triplets(ctx.cfg, ctx.layout, ctx.run_id)
        stats["annotated"] = (load_status(ctx.layout, "annotate") or {}).get("accepted", 0)
        return stats

    def finalize(self, ctx, encoder: str | None) -> dict[str, Any]:
        (stats,) = self.work(ctx.layout, None).require_all()
        return item_result(stats)

    def gate_failed(self, ctx, encoder: str | None) -> None:
        """A triplet set that failed its gate must not look published."""
        lay = ctx.layout
        shutil.rmtree(lay.triplets_rejected, ignore_errors=True)
        if lay.triplets_dir.exists():
            os.replace(lay.triplets_dir, lay.triplets_rejected)
        lay.triplets_jsonl.unlink(missing_ok=True)

    def accepted(self, ctx, encoder: str | None, stats: dict[str, Any]) -> dict[str, Any]:
        from .catalogue import record_version

        # Only a publication that passed its gate becomes a dataset version.
        manifest = record_version(ctx.cfg, ctx.layout, ctx.run_id)
        return {**stats, "version": {k: manifest[k] for k in ("version", "parent", "added", "carried_over")}}

    def outputs(self, layout: RunLayout, encoder: str | None) -> list[Path]:
        return [layout.triplets_dir, layout.triplets_jsonl, layout.triplets_rejected, layout.quarantine,
                layout.failures, layout.failures_part("curation"), layout.manifest, layout.run_config,
                layout.work_dir("publish")]
