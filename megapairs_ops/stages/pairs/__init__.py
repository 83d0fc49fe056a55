"""Pairs: the union of every view's candidates into one row per ordered (query, target),
near-duplicates dropped, a per-query cap, and hard negatives from the query's retrieved set
(build.py, DuckDB out of core, the SQL in sql/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.stage import Device, Stage, item_result

__all__ = ["PairsStage", "build_pairs"]


def build_pairs(cfg, layout):  # noqa: ANN001 - re-exported: the stage as a library call
    from .build import build_pairs as build

    return build(cfg, layout)


class PairsStage(Stage):
    """One work item: the whole table, in DuckDB (its own threads, spilling to disk)."""

    name = "pairs"
    upstream = ("ingest", "mine")
    gate = "pairs"
    rows = ("candidate_rows", "pairs")

    def result_config(self, ctx, encoder: str | None) -> list[Any]:
        return [ctx.cfg.pairs, ctx.cfg.mining.n_hard_negatives, ctx.cfg.seed]

    def plan(self, ctx, encoders: list[str | None], device: Device | None = None) -> list[dict[str, Any]]:
        from megapairs_ops.storage import file_stamps

        lay, names = ctx.layout, [e.name for e in ctx.cfg.encoders]
        inputs = file_stamps(lay.images, *[lay.candidates(n) for n in names], *[lay.neighbours(n) for n in names])
        fingerprint = ctx.cfg.section_fingerprint("pairs-work", *self.result_config(ctx, None), inputs)
        self.work(lay, None).start(fingerprint, ["pairs"])
        return [{"id": "pairs"}]

    def run_item(self, ctx, item: dict[str, Any]) -> dict[str, Any]:
        from .build import build_pairs

        return build_pairs(ctx.cfg, ctx.layout)

    def finalize(self, ctx, encoder: str | None) -> dict[str, Any]:
        (stats,) = self.work(ctx.layout, None).require_all()
        return item_result(stats)

    def outputs(self, layout: RunLayout, encoder: str | None) -> list[Path]:
        return [layout.pairs, layout.failures_part("pairs"), layout.work_dir("pairs")]
