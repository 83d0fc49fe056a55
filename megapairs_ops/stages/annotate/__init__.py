"""Annotate: for every mined pair, an MLLM description of what the two images share and how they
differ (WORD_NUM words), then >= 3 retrieval instructions from an LLM prompted with five
demonstrations out of a pool of fifty (MegaPairs section 3.1, appendix A).

- work.py: the plan (reuse split, pair-id prefix ranges) and finalize;
- item.py: one work item (describe -> checks -> instruct -> checks per pair, checkpointed);
- outcomes.py: what a pair's records are worth under today's checks;
- reuse.py: annotations the catalogue already published, carried over;
- checks.py, parsing.py: what an answer must look like, and reading instructions out of it;
- prompts.py (and the folders of megapairs_ops/prompts/): versioned prompt sets and the draws;
- records.py: per-record checkpoints; request_stats.py: per-step request counters;
- types.py: requests, results and errors every part shares (a leaf module);
- backends/: template (offline baseline), openai (any OpenAI-compatible endpoint), vllm
  (in-process engine), transformers (local generation).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.stage import Device, Resources, Stage

if TYPE_CHECKING:
    from megapairs_ops.config import PipelineConfig

__all__ = ["AnnotateStage"]


class AnnotateStage(Stage):
    name = "annotate"
    upstream = ("pairs",)
    rows = ("pairs_in", "accepted")
    devices = ("gpu", "cpu")

    def result_config(self, ctx, encoder: str | None) -> list[Any]:
        return [ctx.cfg.annotate, ctx.cfg.seed]

    def device(self, cfg: PipelineConfig, encoder: str | None) -> Device:
        """Local models need a GPU worker; an endpoint is reached from any worker."""
        steps = (cfg.annotate.describe, cfg.annotate.instruct)
        local = any(s.backend == "vllm" or (s.backend == "transformers" and s.device == "cuda") for s in steps)
        return "gpu" if local else "cpu"

    @classmethod
    def task_resources(cls, device: Device) -> Resources:
        # Every item asks the models: the llm pool caps how many ask at once.
        return Resources(device=device, pool="llm")

    def plan(self, ctx, encoders: list[str | None], device: Device | None = None) -> list[dict[str, Any]]:
        from .work import plan_annotate_work

        return plan_annotate_work(ctx.cfg, ctx.layout)

    def run_items(self, ctx, items: list[dict[str, Any]], commit) -> None:
        from .item import ItemBackends, annotate_item

        backends = ItemBackends(ctx.cfg, ctx.layout, None)  # built once for the batch, if a pair needs them
        try:
            for item in items:
                commit(item, annotate_item(ctx.cfg, ctx.layout, self.work(ctx.layout, None), item, ctx.run_id,
                                           backends=backends, progress=ctx.progress))
        finally:
            backends.close()

    def finalize(self, ctx, encoder: str | None) -> dict[str, Any]:
        from .work import finalize_annotate

        return finalize_annotate(ctx.cfg, ctx.layout, ctx.run_id)

    def work_left(self, status: dict[str, Any]) -> bool:
        return bool(status.get("retryable_failures"))

    def outputs(self, layout: RunLayout, encoder: str | None) -> list[Path]:
        return [layout.annotation_records.parent, layout.annotations, layout.failures_part("annotate"),
                layout.work_dir("annotate")]
