"""What each stage needs (NeMo Curator style), declared in one table and resolved against the
deployment's `resources` config into an Airflow queue and pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megapairs_ops.config import PipelineConfig


@dataclass(frozen=True)
class StageResources:
    device: Literal["cpu", "gpu"] = "cpu"
    # Which configured pool caps this stage: "gpu" (accelerator work), "llm" (inference servers) or None.
    pool_key: Literal["gpu", "llm"] | None = None

    def queue(self, cfg: PipelineConfig) -> str | None:
        return cfg.resources.gpu_queue if self.device == "gpu" else None

    def pool(self, cfg: PipelineConfig) -> str | None:
        return {"gpu": cfg.resources.gpu_pool, "llm": cfg.resources.llm_pool}.get(self.pool_key or "")


CPU = StageResources()
STAGE_RESOURCES = {
    "ingest": CPU,
    "mine": CPU,  # faiss-cpu by default; the GPU index path (issue 5) switches this to "gpu"
    "pairs": CPU,
    "annotate": StageResources(device="cpu", pool_key="llm"),
    "publish": CPU,
}


def stage_resources(cfg: PipelineConfig, stage: str, encoder: str | None = None) -> StageResources:
    if stage == "embed":
        from megapairs_ops.stages.embed.encoders import encoder_resources

        needs = encoder_resources(cfg.encoder(encoder).kind) if encoder else None
        return StageResources(device="gpu", pool_key="gpu") if needs and needs.device != "cpu" else CPU
    return STAGE_RESOURCES[stage]
