"""Embed's plan: images.parquet cut into shards (one manifest each, shared by every encoder),
encoders grouped so image encoders of one device decode each image once, and one work item per
(group, shard). Each encoder keeps its own work dir: a shard is done for it when its stats file
is committed there, after the shard's vectors (storage.WorkDir)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import EncoderConfig, PipelineConfig, result_view
from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline.stage import Device
from megapairs_ops.stages.embed.encoders import kind_device
from megapairs_ops.storage import WorkDir, read_json, write_json

# Part of every shard's fingerprint: bumped when the shard format or its semantics change.
EMBED_VERSION = "3"
_MANIFEST_COLUMNS = ["image_id", "sha256", "path", "caption"]


class ShardPlan:
    """The corpus cut into shards; manifests and plan.json live in `dir`."""

    def __init__(self, directory: Path) -> None:
        meta = read_json(directory / "plan.json")
        self.dir = directory
        self.key: str = meta["key"]
        self.n_rows: int = meta["n_rows"]
        self.shard_size: int = meta["shard_size"]
        self.digests: list[str] = meta["digests"]

    @property
    def n_shards(self) -> int:
        return len(self.digests)

    def rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n_rows)

    def manifest(self, shard: int) -> dict[str, list]:
        table = pq.read_table(self.dir / f"shard-{shard:06d}.parquet")
        return {c: table.column(c).to_pylist() for c in _MANIFEST_COLUMNS}


def _plans_root(layout: RunLayout) -> Path:
    """Shard manifests, shared by every encoder's work (one set per images.parquet)."""
    return layout.work_dir("embed") / "manifests"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _iter_shards(images: Path, shard_size: int) -> Iterator[dict[str, list]]:
    """images.parquet rows in consecutive shards of exactly `shard_size` rows (the last may be short).
    `sha256` falls back to image_id (its prefix) for tables written without it."""
    available = pq.read_schema(images).names
    columns = [c for c in _MANIFEST_COLUMNS if c in available]
    buffer: dict[str, list] = {c: [] for c in _MANIFEST_COLUMNS}
    for batch in pq.ParquetFile(images).iter_batches(batch_size=min(shard_size, 65536), columns=columns):
        for column in _MANIFEST_COLUMNS:
            source = column if column in available else "image_id"
            buffer[column].extend(batch.column(source).to_pylist())
        while len(buffer["image_id"]) >= shard_size:
            yield {c: v[:shard_size] for c, v in buffer.items()}
            buffer = {c: v[shard_size:] for c, v in buffer.items()}
    if buffer["image_id"]:
        yield buffer


def ensure_shard_plan(cfg: PipelineConfig, layout: RunLayout, shard_size: int | None = None) -> ShardPlan:
    images = layout.images
    if not images.is_file():
        raise FileNotFoundError(f"embed: {images} not found; run the ingest stage first")
    shard_size = shard_size or cfg.embed.shard_size
    st = images.stat()
    key = _digest([EMBED_VERSION, str(images), st.st_size, st.st_mtime_ns, shard_size])
    root = _plans_root(layout)
    final = root / key
    if not (final / "plan.json").is_file():
        tmp = root / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir(parents=True)
        try:
            digests = []
            for index, shard in enumerate(_iter_shards(images, shard_size)):
                pq.write_table(pa.table(shard), tmp / f"shard-{index:06d}.parquet", compression="zstd")
                digests.append(_digest([shard[c] for c in _MANIFEST_COLUMNS]))
            n_rows = pq.ParquetFile(images).metadata.num_rows
            write_json({"key": key, "n_rows": n_rows, "shard_size": shard_size, "digests": digests}, tmp / "plan.json")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "plan.json").is_file():  # not a concurrent planner's win: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # Plans of an earlier images.parquet are dead; temp dirs of a concurrent planner are left alone.
    for stale in root.iterdir():
        if stale.name != key and not stale.name.startswith(f".{key}."):
            shutil.rmtree(stale, ignore_errors=True)
    return ShardPlan(final)


def load_shard_plan(layout: RunLayout, key: str) -> ShardPlan:
    directory = _plans_root(layout) / key
    if not (directory / "plan.json").is_file():
        raise FileNotFoundError(
            f"embed: work plan {key} is gone (images.parquet changed since planning); plan the embed work again"
        )
    return ShardPlan(directory)


# ---------------------------------------------------------------------------------------------
# Shard outputs and their status records


def encoder_groups(cfg: PipelineConfig, names: Iterable[str]) -> list[list[str]]:
    """Image encoders of one resource class share a task (one decode per image); text and
    precomputed views run alone."""
    groups: dict[str, list[str]] = {}
    alone: list[list[str]] = []
    for name in names:
        enc = cfg.encoder(name)
        if enc.kind == "precomputed" or enc.modality == "text" or not cfg.embed.share_decode:
            alone.append([name])
        else:
            groups.setdefault(encoder_device(enc), []).append(name)
    return list(groups.values()) + alone


def encoder_device(enc: EncoderConfig) -> Device:
    """Where an encoder's work items run: "gpu" for model-backed kinds unless pinned to the CPU."""
    return "cpu" if enc.device == "cpu" or kind_device(enc.kind) == "cpu" else "gpu"


def group_device(cfg: PipelineConfig, group: list[str]) -> str:
    return "gpu" if any(encoder_device(cfg.encoder(n)) == "gpu" for n in group) else "cpu"


def encoder_fingerprint(cfg: PipelineConfig, enc: EncoderConfig) -> str:
    """What an encoder's vectors are made from: its result config (not the band, which is
    mining's, nor runtime knobs such as batch_size or device) and the decode limit."""
    view = {k: v for k, v in result_view(enc).items() if k != "band"}
    return _digest([EMBED_VERSION, view, cfg.ingest.max_pixels])


def encoder_work(layout: RunLayout, name: str) -> WorkDir:
    return WorkDir(layout.work_dir(f"embed-{name}"))


def shard_id(shard: int) -> str:
    return f"shard-{shard:06d}"


def shard_file(layout: RunLayout, name: str, shard: int) -> Path:
    """One finished shard of an encoder: vectors, ids and quarantine rows in one .npz."""
    return encoder_work(layout, name).part(shard_id(shard), "shard", "npz")


def shard_done(layout: RunLayout, name: str, shard: int) -> bool:
    return encoder_work(layout, name).is_done(shard_id(shard)) and shard_file(layout, name, shard).is_file()


def start_encoder_work(cfg: PipelineConfig, layout: RunLayout, plan: ShardPlan, enc: EncoderConfig) -> dict[str, Any]:
    """The encoder's work dir for this shard plan: kept while the same config, corpus and
    source (precomputed vectors) are embedded, cleared otherwise."""
    parts: list[Any] = [encoder_fingerprint(cfg, enc), plan.key]
    if enc.kind == "precomputed":
        from megapairs_ops.stages.embed.encoders import precomputed

        parts.append(precomputed.source_digest(enc, precomputed.inspect_source(enc)))
    return encoder_work(layout, enc.name).start(_digest(parts), [shard_id(s) for s in range(plan.n_shards)],
                                                shard_plan=plan.key)


def plan_embed_work(
    cfg: PipelineConfig, layout: RunLayout, encoders: Iterable[str] | None = None, *, shard_size: int | None = None
) -> list[dict[str, Any]]:
    """Cut the corpus into shards (once) and list the work items: one per (encoder group,
    shard), {id, encoders, shard, plan, device}, group by group. Running an item whose shard is
    finished for its encoders is a no-op."""
    plan = ensure_shard_plan(cfg, layout, shard_size)
    names = list(encoders) if encoders is not None else [e.name for e in cfg.encoders]
    for name in names:
        enc = cfg.encoder(name)
        start_encoder_work(cfg, layout, plan, enc)
        if enc.kind == "precomputed":
            from megapairs_ops.stages.embed.from_files import precomputed_mapping

            precomputed_mapping(cfg, layout, plan, enc)
    return [
        {"id": f"{'+'.join(group)}@{shard_id(s)}", "encoders": group, "shard": s, "plan": plan.key,
         "device": group_device(cfg, group)}
        for group in encoder_groups(cfg, names)
        for s in range(plan.n_shards)
    ]
