"""Mine: k nearest neighbours per image for each view (FAISS), kept when inside the view's band.

- work.py: the plan (query ranges; full or incremental mining decided once), one work item,
  finalize (parts merged into candidates/<enc>.parquet and neighbours/<enc>.parquet);
- index.py: the index choice (exact and sharded, IVF-Flat, IVF-PQ with exact re-ranking; CPU or
  GPU), vectors.npy read with pread, devices; docs/mining.md describes the rule;
- flat.py, ivf.py: the searchers (exact, sharded to the memory budget; IVF trained and calibrated);
- incremental.py: reusing a published version's exact neighbours over a grown corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.stage import Device, Resources, Stage

if TYPE_CHECKING:
    from megapairs_ops.config import PipelineConfig

__all__ = ["MineStage"]


class MineStage(Stage):
    name = "mine"
    per_encoder = True
    upstream = ("embed",)
    gate = "mining"
    rows = ("queries", "candidates")
    devices = ("gpu", "cpu")

    def result_config(self, ctx, encoder: str | None) -> list[Any]:
        return [ctx.cfg.mining, ctx.cfg.encoder(encoder or "").band]

    def device(self, cfg: PipelineConfig, encoder: str | None) -> Device:
        return "gpu" if cfg.mining.device == "cuda" else "cpu"

    @classmethod
    def task_resources(cls, device: Device) -> Resources:
        # FAISS already uses every core of its worker: items run one at a time.
        return Resources(device=device, pool="gpu" if device == "gpu" else "default")

    def plan(self, ctx, encoders: list[str | None], device: Device | None = None) -> list[dict[str, Any]]:
        from .work import plan_mining_work

        return [item for enc in encoders for item in plan_mining_work(ctx.cfg, ctx.layout, enc or "")]

    def run_item(self, ctx, item: dict[str, Any]) -> dict[str, Any]:
        from .work import search_queries

        return search_queries(ctx.cfg, ctx.layout, item)

    def finalize(self, ctx, encoder: str | None) -> dict[str, Any]:
        from .work import finalize_mining

        return finalize_mining(ctx.cfg, ctx.layout, encoder or "")

    def outputs(self, layout: RunLayout, encoder: str | None) -> list[Path]:
        enc = encoder or ""
        return [layout.candidates(enc), layout.neighbours(enc), layout.neighbours_meta(enc),
                layout.work_dir(f"mine-{enc}")]
