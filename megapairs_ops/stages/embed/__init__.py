"""Embed: every image (or caption) of ingest/images.parquet through each encoder.

Output contract, per encoder: embeddings/<enc>/vectors.npy (float32, unit rows) aligned row for
row with embeddings/<enc>/ids.parquet (image_id), and quarantine/embed-<enc>.parquet for the
items this view could not encode (always written).

- plan.py: images.parquet cut into shards of `embed.shard_size` rows; work items are (encoder
  group, shard); each encoder commits its shards in its own work dir;
- shards.py: running shards (one model per encoder, the embedding cache, CUDA OOM backoff);
- images.py: decode once per image for every image encoder of a group;
- from_files.py: precomputed vectors read shard by shard;
- finalize.py: an encoder's shards streamed into its outputs (bounded memory);
- cache.py: the content-addressed cache (image sha256 / caption hash x encoder identity), so a
  run over a grown corpus computes only the new images;
- encoders/: the encoder kinds (transformers CLIP/DINOv2, open_clip, weight-free classic ones,
  precomputed).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.stage import Commit, Device, Resources, Stage

if TYPE_CHECKING:
    from megapairs_ops.config import PipelineConfig
    from megapairs_ops.storage import WorkDir

__all__ = ["EmbedStage", "embed_corpus", "embed_corpus_multi", "run_embed_work"]


class EmbedStage(Stage):
    name = "embed"
    per_encoder = True
    upstream = ("ingest",)
    rows = ("images_in", "embedded")
    devices = ("gpu", "cpu")

    def result_config(self, ctx, encoder: str | None) -> list[Any]:
        from megapairs_ops.config import result_view

        enc = ctx.cfg.encoder(encoder)
        return [{k: v for k, v in result_view(enc).items() if k != "band"}, ctx.cfg.ingest.max_pixels]

    def device(self, cfg: PipelineConfig, encoder: str | None) -> Device:
        from .plan import encoder_device

        return encoder_device(cfg.encoder(encoder or ""))

    @classmethod
    def task_resources(cls, device: Device) -> Resources:
        gpu = device == "gpu"
        # A CPU encoder keeps one core busy per item: items run side by side under the CLI.
        return Resources(device=device, pool="gpu" if gpu else "default", processes=not gpu)

    def per_task(self, cfg: PipelineConfig) -> int:
        return cfg.embed.shards_per_task

    def work(self, layout: RunLayout, encoder: str | None) -> WorkDir:
        from .plan import encoder_work

        return encoder_work(layout, encoder or "")

    def plan(self, ctx, encoders: list[str | None], device: Device | None = None) -> list[dict[str, Any]]:
        from .plan import plan_embed_work

        return plan_embed_work(ctx.cfg, ctx.layout, [e for e in encoders if e])

    def is_done(self, ctx, item: dict[str, Any]) -> bool:
        from .plan import shard_done

        return all(shard_done(ctx.layout, name, item["shard"]) for name in item["encoders"])

    def committed(self, ctx, item: dict[str, Any]) -> dict[str, Any]:
        from .plan import shard_id

        return {"encoders": {name: self.work(ctx.layout, name).stats(shard_id(item["shard"])) for name in item["encoders"]}}

    def commit(self, ctx, item: dict[str, Any], stats: dict[str, Any]) -> None:
        from .plan import shard_id

        extra = {k: v for k, v in stats.items() if k != "encoders"}
        for name, status in stats["encoders"].items():
            self.work(ctx.layout, name).commit(shard_id(item["shard"]), {**status, **extra})

    def run_items(self, ctx, items: list[dict[str, Any]], commit: Commit) -> None:
        _run_items(ctx.cfg, ctx.layout, items, commit, progress=ctx.progress)

    def finalize(self, ctx, encoder: str | None) -> dict[str, Any]:
        from .finalize import finalize_embed

        return finalize_embed(ctx.cfg, ctx.layout, encoder or "")

    def outputs(self, layout: RunLayout, encoder: str | None) -> list[Path]:
        return [layout.embedding_dir(encoder or ""), layout.quarantine_part(f"embed-{encoder}"),
                layout.work_dir(f"embed-{encoder}")]


def _run_items(cfg: PipelineConfig, layout: RunLayout, items: list[dict[str, Any]], commit: Commit,
               progress: bool = False, built: dict | None = None) -> None:
    """Items of one shard plan, group by group: each group's models load once for all its shards."""
    from .plan import load_shard_plan
    from .shards import run_shards

    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault((item["plan"], tuple(item["encoders"])), []).append(item)
    for (plan_key, group), group_items in groups.items():
        by_shard = {item["shard"]: item for item in group_items}
        run_shards(cfg, layout, load_shard_plan(layout, plan_key), list(group), sorted(by_shard),
                   lambda s, statuses: commit(by_shard[s], {"encoders": statuses}), progress, built)


def run_embed_work(cfg: PipelineConfig, layout: RunLayout, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the items not done yet (as one mapped task would); counts per encoder."""
    stage = EmbedStage()
    ctx = _context(cfg, layout)
    todo = [item for item in items if not stage.is_done(ctx, item)]
    totals: dict[str, Counter] = {name: Counter() for item in items for name in item["encoders"]}
    for item in items:
        if item not in todo:
            for name in item["encoders"]:
                totals[name]["shards_skipped"] += 1

    def commit(item: dict[str, Any], stats: dict[str, Any]) -> None:
        stage.commit(ctx, item, stats)
        for name, status in stats["encoders"].items():
            totals[name].update({"reused": status.get("reused", 0), "computed": status.get("computed", 0)})

    _run_items(cfg, layout, todo, commit)
    return {"encoders": {name: {"shards_skipped": 0, "reused": 0, "computed": 0, **counts}
                         for name, counts in totals.items()}}


def embed_corpus(cfg: PipelineConfig, encoder_name: str, layout: RunLayout, **kw: Any) -> dict[str, Any]:
    """Embed every row of layout.images with the named encoder, in this process."""
    return embed_corpus_multi(cfg, [encoder_name], layout, **kw)[encoder_name]


def embed_corpus_multi(cfg: PipelineConfig, encoder_names: Iterable[str], layout: RunLayout, *,
                       progress: bool = False, shard_size: int | None = None,
                       encoders: dict | None = None) -> dict[str, dict[str, Any]]:
    """Embed with several encoders in this process (image encoders of one device share one
    decode per image); each encoder's stats. `encoders` may hold models already built from the
    same configs (notebooks, benchmarks), which are then not loaded again. Each encoder's work
    dir is removed once its outputs are written, as after a finished stage."""
    from .finalize import finalize_embed
    from .plan import encoder_work, plan_embed_work

    names = list(encoder_names)
    stage = EmbedStage()
    ctx = _context(cfg, layout)
    items = [i for i in plan_embed_work(cfg, layout, names, shard_size=shard_size) if not stage.is_done(ctx, i)]
    _run_items(cfg, layout, items, lambda item, stats: stage.commit(ctx, item, stats), progress, encoders)
    stats = {name: finalize_embed(cfg, layout, name) for name in names}
    for name in names:
        encoder_work(layout, name).clear()
    return stats


def _context(cfg: PipelineConfig, layout: RunLayout):
    from megapairs_ops.pipeline.context import RunContext

    return RunContext(cfg, Path("."), layout, layout.root.name)
