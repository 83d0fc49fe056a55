"""Embed stage: every image (or caption) of ingest/images.parquet through one or more encoders.

Output contract, per encoder: embeddings/{enc}/vectors.npy (float32, unit rows) aligned row for
row with embeddings/{enc}/ids.parquet (image_id), and quarantine/embed-{enc}.parquet for the
items this view could not encode (always written).

How it scales:
- Plan: images.parquet is cut once into shards of `embed.shard_size` rows (its own order); each
  shard's rows are saved as a small manifest under embeddings/_plan/<key>/ so a task reads only
  its shards. Work items are (encoder group, range of shards): one Airflow mapped task each.
- Shards: each finished shard of an encoder is written atomically (vectors + ids + quarantine
  rows in one .npz) and then committed by a small status JSON naming the shard's content digest
  and the encoder's config fingerprint and identity. A killed task resumes at the first shard
  without a valid status; batches never span shards, so a resumed run computes exactly the
  vectors an uninterrupted one would.
- Finalize: the shards are streamed into a memory-mapped vectors.npy and ids.parquet (bounded
  memory), then removed.
- Cache: vectors are also kept in a content-addressed cache (embed_cache.py) keyed by image
  sha256 (caption sha256 for text views) and the encoder identity; a later run over a grown
  corpus computes only what the cache does not hold. Stats count `reused` and `computed`.
- Throughput: image encoders of one task share one decode per image (each preprocesses it its
  own way) in DataLoader worker processes; batches travel as uint8 in pinned memory on CUDA and
  are normalised on the device; models run under inference_mode and CUDA autocast. On CPU the
  model already uses every core, so decode runs in-process between batches instead of competing
  with it. A CUDA out-of-memory halves the batch and retries down to one item.

Functions for orchestration (Airflow maps over the work items):
- plan_embed_work(cfg, layout, encoders=None) -> list of JSON-able work items
- run_embed_work(cfg, layout, item) -> counts (idempotent: finished shards are skipped)
- finalize_embed(cfg, layout, encoder) -> the stage's stats (vectors.npy / ids.parquet written)
- embed_corpus(cfg, encoder, layout) and embed_corpus_multi(cfg, encoders, layout) do all three.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops import media
from megapairs_ops.config import EncoderConfig, PipelineConfig
from megapairs_ops.stages.embed.cache import EmbeddingCache, identity_hash, text_key
from megapairs_ops.stages.embed.encoders import EncodeInputError, Encoder, build_encoder, encoder_resources, l2_normalise
from megapairs_ops.storage import (
    QUARANTINE_SCHEMA,
    RunLayout,
    atomic_path,
    read_json,
    write_json,
    write_problem_rows,
)

log = logging.getLogger("megapairs.embed")

# Part of every shard's fingerprint: bumped when the shard format or its semantics change.
EMBED_VERSION = "2"
_MANIFEST_COLUMNS = ["image_id", "sha256", "path", "caption"]
_EXPECTED_FAILURES = (EncodeInputError, media.ImageRejected)
# Test hook: SIGKILL this process after writing this many shards (kill-and-resume tests).
_KILL_AFTER_ENV = "MEGAPAIRS_EMBED_KILL_AFTER_SHARDS"


# ---------------------------------------------------------------------------------------------
# Plan: shard manifests


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
    return layout.root / "embeddings" / "_plan"


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


def _ensure_plan(cfg: PipelineConfig, layout: RunLayout, shard_size: int | None = None) -> ShardPlan:
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


def _load_plan(layout: RunLayout, key: str) -> ShardPlan:
    directory = _plans_root(layout) / key
    if not (directory / "plan.json").is_file():
        raise FileNotFoundError(
            f"embed: work plan {key} is gone (images.parquet changed since planning); plan the embed work again"
        )
    return ShardPlan(directory)


# ---------------------------------------------------------------------------------------------
# Shard outputs and their status records


def _shards_dir(layout: RunLayout, name: str) -> Path:
    return layout.embedding_dir(name) / "shards"


def _shard_file(layout: RunLayout, name: str, shard: int, suffix: str) -> Path:
    return _shards_dir(layout, name) / f"shard-{shard:06d}.{suffix}"


def encoder_fingerprint(cfg: PipelineConfig, enc: EncoderConfig) -> str:
    """What the config says about an encoder's vectors (the pipeline's embed fingerprint, too)."""
    return _digest([EMBED_VERSION, enc.model_dump(mode="json", exclude={"band"}), cfg.ingest.max_pixels])


def _shard_status(layout: RunLayout, name: str, shard: int) -> dict | None:
    path = _shard_file(layout, name, shard, "json")
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _shard_done(
    layout: RunLayout, name: str, shard: int, digest: str, fingerprint: str, identity: str | None = None
) -> bool:
    status = _shard_status(layout, name, shard)
    return bool(
        status
        and status.get("digest") == digest
        and status.get("fingerprint") == fingerprint
        and (identity is None or status.get("identity") == identity)
        and _shard_file(layout, name, shard, "npz").is_file()
    )


_shards_written = 0


def _after_shard_written() -> None:
    global _shards_written
    _shards_written += 1
    limit = os.environ.get(_KILL_AFTER_ENV)
    if limit and _shards_written >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Encoder groups and work items


def _groups(cfg: PipelineConfig, names: Iterable[str]) -> list[list[str]]:
    """Image encoders of one resource class share a task (one decode per image); text and
    precomputed views run alone."""
    groups: dict[str, list[str]] = {}
    alone: list[list[str]] = []
    for name in names:
        enc = cfg.encoder(name)
        if enc.kind == "precomputed" or enc.modality == "text" or not cfg.embed.share_decode:
            alone.append([name])
        else:
            groups.setdefault(encoder_resources(enc.kind).device, []).append(name)
    return list(groups.values()) + alone


def _group_device(cfg: PipelineConfig, group: list[str]) -> str:
    return "gpu" if any(encoder_resources(cfg.encoder(n).kind).device != "cpu" for n in group) else "cpu"


def plan_embed_work(
    cfg: PipelineConfig, layout: RunLayout, encoders: Iterable[str] | None = None, *, shard_size: int | None = None
) -> list[dict[str, Any]]:
    """Cut the corpus into shards (once) and list the work items: {encoders, shards: [lo, hi),
    plan, device}. Items cover every shard; running one whose shards are finished is a no-op."""
    plan = _ensure_plan(cfg, layout, shard_size)
    names = list(encoders) if encoders is not None else [e.name for e in cfg.encoders]
    for name in names:
        if cfg.encoder(name).kind == "precomputed":
            _precomputed_mapping(cfg, layout, plan, cfg.encoder(name))
    step = cfg.embed.shards_per_task
    return [
        {"encoders": group, "shards": [lo, min(lo + step, plan.n_shards)], "plan": plan.key,
         "device": _group_device(cfg, group)}
        for group in _groups(cfg, names)
        for lo in range(0, plan.n_shards, step)
    ]


def run_embed_work(cfg: PipelineConfig, layout: RunLayout, item: dict[str, Any], progress: bool = False) -> dict:
    """Embed the item's shards that are not finished yet; returns counts per encoder."""
    plan = _load_plan(layout, item["plan"])
    lo, hi = item["shards"]
    return _run_shards(cfg, layout, plan, list(item["encoders"]), range(lo, hi), progress)


def cache_root(cfg: PipelineConfig, layout: RunLayout) -> Path:
    """Beside the run directories by default: every run under one output root shares it, and it
    lives on the storage the workers already share, unlike a per-machine home directory."""
    base = layout.root.parent
    if cfg.embed.cache_dir:
        path = Path(cfg.embed.cache_dir).expanduser()
        return path if path.is_absolute() else base / path
    return base / ".cache" / "embeddings"


# ---------------------------------------------------------------------------------------------
# Running shards


class _EncoderRun:
    """One encoder inside a task: the model, its cache, and its forward batch after OOM backoff."""

    def __init__(self, cfg: PipelineConfig, layout: RunLayout, enc: EncoderConfig, encoder: Encoder) -> None:
        self.enc, self.encoder, self.layout = enc, encoder, layout
        self.name = enc.name
        self.stage = f"embed-{enc.name}"
        self.fingerprint = encoder_fingerprint(cfg, enc)
        self.identity = identity_hash(encoder.identity)
        self.cache = (
            EmbeddingCache(cache_root(cfg, layout), encoder.identity, encoder.dim, cfg.embed.memory_limit)
            if cfg.embed.cache
            else None
        )
        # Forward batch actually used: enc.batch_size until a CUDA out-of-memory halves it.
        self.forward_batch = enc.batch_size
        self.totals: Counter = Counter()

    def keys(self, manifest: dict[str, list]) -> list[str | None]:
        if self.encoder.modality == "text":
            return [text_key(c) if isinstance(c, str) else None for c in manifest["caption"]]
        return manifest["sha256"]

    def encode(self, batch: Any) -> np.ndarray:
        """Encode in forward batches of at most `forward_batch`, halving it on CUDA out-of-memory."""
        n, start, parts = len(batch), 0, []
        while start < n:
            size = min(self.forward_batch, n - start)
            try:
                out = self.encoder.encode_batch(batch[start : start + size])
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                _release_cuda_memory()
                if size == 1:
                    raise RuntimeError(
                        f"{self.stage}: CUDA out of memory even at batch size 1; free the GPU or use a larger one"
                    ) from exc
                self.forward_batch = max(1, size // 2)
                log.warning("%s: CUDA out of memory at batch %d; retrying at %d", self.stage, size, self.forward_batch)
                continue
            if out.shape != (size, self.encoder.dim):
                raise RuntimeError(f"{self.stage}: encoder returned shape {out.shape}, expected {(size, self.encoder.dim)}")
            parts.append(out)
            start += size
        return np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), np.float32)


def _is_out_of_memory(exc: Exception) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def _release_cuda_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _concat(pieces: list[Any]) -> Any:
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], list):
        return [item for piece in pieces for item in piece]
    if isinstance(pieces[0], np.ndarray):
        return np.concatenate(pieces)
    import torch

    return torch.cat(pieces)


class _ShardWork:
    """One encoder x one shard: cache hits, rows still to encode, results, quarantine rows."""

    def __init__(self, run: _EncoderRun, shard: int, digest: str, manifest: dict[str, list], hits: dict) -> None:
        self.run, self.shard, self.digest, self.manifest = run, shard, digest, manifest
        self.keys = run.keys(manifest)
        n = len(manifest["image_id"])
        self.hit_rows = [r for r in range(n) if self.keys[r] is not None and self.keys[r] in hits]
        self.hits = [hits[self.keys[r]] for r in self.hit_rows]
        hit_set = set(self.hit_rows)
        self.todo = [r for r in range(n) if r not in hit_set]
        self.vectors: np.ndarray | None = None
        self.computed: list[int] = []
        self.problems: list[tuple[int, str, str]] = []
        self._pending_rows: list[int] = []
        self._pending: list[Any] = []

    def fail(self, row: int, reason: str, detail: str) -> None:
        self.problems.append((row, reason, detail))

    def add(self, rows: list[int], batch: Any) -> None:
        """Queue prepared rows; encode in batches of `batch_size` counted from the shard's start,
        so a batch holds the same rows however the decode side chunked them (exact resume)."""
        self._pending_rows += rows
        self._pending.append(batch)
        size = self.run.enc.batch_size
        while len(self._pending_rows) >= size:
            merged = _concat(self._pending)
            self._encode(self._pending_rows[:size], merged[:size])
            self._pending_rows = self._pending_rows[size:]
            self._pending = [merged[size:]] if self._pending_rows else []

    def _flush(self) -> None:
        if self._pending_rows:
            self._encode(self._pending_rows, _concat(self._pending))
        self._pending_rows, self._pending = [], []

    def _encode(self, rows: list[int], batch: Any) -> None:
        out = self.run.encode(batch)
        if self.vectors is None:
            self.vectors = np.zeros((len(self.keys), out.shape[1]), np.float32)
        finite = np.isfinite(out).all(axis=1)
        for row, vector, ok in zip(rows, out, finite):
            if ok:
                self.vectors[row] = vector
                self.computed.append(row)
            else:
                self.fail(row, "non_finite_embedding", "encoder output NaN/inf")

    def finish(self) -> dict[str, int]:
        """Encode what is left, fill in the cache hits, write the shard and commit its status."""
        self._flush()
        run, dim = self.run, self.run.encoder.dim
        if self.vectors is None:
            self.vectors = np.zeros((len(self.keys), dim), np.float32)
        if self.hit_rows:
            self.vectors[self.hit_rows] = run.cache.read(self.hits)
        if run.cache is not None and self.computed:
            run.cache.write([self.keys[r] for r in self.computed], self.vectors[self.computed])
        counts = {"reused": len(self.hit_rows), "computed": len(self.computed)}
        _write_shard(run.layout, run.name, self.shard, self.manifest, self.vectors, self.hit_rows + self.computed,
                     self.problems, {"digest": self.digest, "fingerprint": run.fingerprint,
                                     "identity": run.identity, "dim": dim, **counts})
        run.totals.update(counts)
        self.vectors = None  # the window's other shards are still running: free this one now
        return counts


def _write_shard(
    layout: RunLayout,
    name: str,
    shard: int,
    manifest: dict[str, list],
    vectors: np.ndarray,
    good_rows: list[int],
    problems: list[tuple[int, str, str]],
    status: dict[str, Any],
) -> None:
    good = sorted(good_rows)
    problems = sorted(problems)
    paths = manifest["path"]
    part = {
        "vectors": np.ascontiguousarray(vectors[good], dtype=np.float32),
        "ids": np.array([manifest["image_id"][r] for r in good], dtype=str),
        "q_path": np.array([paths[r] for r, _, _ in problems], dtype=str),
        "q_reason": np.array([reason for _, reason, _ in problems], dtype=str),
        "q_detail": np.array([detail for _, _, detail in problems], dtype=str),
    }
    with atomic_path(_shard_file(layout, name, shard, "npz")) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **part)
    # The status is written last: a shard without one (or with a stale one) is redone.
    write_json(
        {"shard": shard, "rows": len(paths), "embedded": len(good), "quarantined": len(problems), **status},
        _shard_file(layout, name, shard, "json"),
    )
    _after_shard_written()


def _run_shards(
    cfg: PipelineConfig,
    layout: RunLayout,
    plan: ShardPlan,
    names: list[str],
    shards: range,
    progress: bool,
    built: dict[str, Encoder] | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"encoders": {}, "shards": [shards.start, shards.stop]}
    for group in _groups(cfg, names):
        encs = [cfg.encoder(n) for n in group]
        # First by config alone, so a task whose shards are all finished never loads a model.
        pending = {
            e.name: [s for s in shards if not _shard_done(layout, e.name, s, plan.digests[s], encoder_fingerprint(cfg, e))]
            for e in encs
        }
        counts: dict[str, dict] = {}
        todo = [e for e in encs if pending[e.name]]
        if encs[0].kind == "precomputed":  # its identity (the files' stamps) is cheap: always checked
            counts[encs[0].name] = _run_precomputed(cfg, layout, plan, encs[0], shards, pending)
        elif todo:
            runs = [_EncoderRun(cfg, layout, e, (built or {}).get(e.name) or build_encoder(e)) for e in todo]
            for run in runs:  # now the identity is known: a shard made under another one is redone
                pending[run.name] = [
                    s for s in shards
                    if not _shard_done(layout, run.name, s, plan.digests[s], run.fingerprint, run.identity)
                ]
            _keep_freed_memory_mapped()
            with _gc_frozen():
                _run_encoders(cfg, plan, runs, pending, progress)
            counts = {run.name: dict(run.totals) for run in runs}
        for e in encs:
            result["encoders"][e.name] = {
                "shards_skipped": len(shards) - len(pending[e.name]), "reused": 0, "computed": 0, **counts.get(e.name, {})
            }
    return result


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc malloc.h


def _keep_freed_memory_mapped() -> None:
    """Stop glibc handing freed memory back to the kernel in this (embedding) process.

    Every forward pass allocates and frees the same megabytes of activations, and decode frees
    whole images between batches; by default glibc unmaps or trims those pages and the next batch
    faults them in again (zeroed by the kernel). Measured on the 2-core CPU bench: +24% forward
    rate, +35% end to end. Peak RSS does not change (the pages are reused, not added); freed
    memory is just not returned before the task ends. Process-wide and idempotent; a no-op where
    the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)  # the largest glibc accepts; also freezes the dynamic one
    mallopt(_M_TRIM_THRESHOLD, 2**62)
    mallopt(_M_TOP_PAD, 64 * 2**20)


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """Keep the interpreter's long-lived objects (torch, transformers: ~400k) out of the garbage
    collector while batches run: each full collection the loop triggers would rescan them all
    (~0.2 s, measured as 2.5% of a CPU run)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run_encoders(
    cfg: PipelineConfig, plan: ShardPlan, runs: list[_EncoderRun], pending: dict[str, list[int]], progress: bool
) -> None:
    """Shards in windows of `shards_per_task`: one cache lookup and one decode pipeline per window."""
    from tqdm.auto import tqdm

    todo = sorted({s for run in runs for s in pending[run.name]})
    wanted = {run.name: set(pending[run.name]) for run in runs}
    bar = tqdm(total=sum(plan.rows(s)[1] - plan.rows(s)[0] for s in todo),
               desc="embed-" + "+".join(run.name for run in runs), unit="row", disable=not progress)
    window = cfg.embed.shards_per_task
    for start in range(0, len(todo), window):
        shards = todo[start : start + window]
        manifests = {s: plan.manifest(s) for s in shards}
        works: dict[int, list[_ShardWork | None]] = {s: [] for s in shards}
        for run in runs:
            mine = [s for s in shards if s in wanted[run.name]]
            keys = [k for s in mine for k in run.keys(manifests[s]) if k is not None]
            hits = run.cache.lookup(keys) if run.cache is not None else {}
            for s in shards:
                works[s].append(_ShardWork(run, s, plan.digests[s], manifests[s], hits) if s in mine else None)
        if runs[0].encoder.modality == "text":
            for s in shards:
                _encode_texts(works[s][0])
                bar.update(len(manifests[s]["image_id"]))
        else:
            _encode_images(cfg, runs, shards, manifests, works, bar)
    bar.close()


def _encode_texts(work: _ShardWork) -> None:
    captions = work.manifest["caption"]
    for start in range(0, len(work.todo), work.run.enc.batch_size):
        chunk = work.todo[start : start + work.run.enc.batch_size]
        rows, items, unexpected = [], [], []
        for row in chunk:
            item, failure = _safely(work.run.encoder.prepare_text, captions[row] or "")
            if failure:
                work.fail(row, failure[0], failure[1])
                if failure[2]:
                    unexpected.append(failure[1])
            else:
                rows.append(row)
                items.append(item)
        if len(chunk) >= 8 and len(unexpected) == len(chunk):
            raise RuntimeError(f"{work.run.stage}: every item of a batch failed to preprocess: {unexpected[0]}")
        if rows:
            work.add(rows, items)
    work.finish()


def _safely(fn, arg) -> tuple[Any, tuple[str, str, bool] | None]:
    try:
        return fn(arg), None
    except _EXPECTED_FAILURES as exc:
        return None, (exc.reason, exc.detail, False)
    except Exception as exc:  # noqa: BLE001 - an odd input must not take the run down
        return None, ("preprocess_failed", f"{type(exc).__name__}: {exc}", True)


# -- images: decode once, preprocess per encoder ------------------------------------------------


class _DecodeRows:
    """Map-style dataset over the rows of a window that some encoder still needs."""

    def __init__(self, paths: list[str], needs: np.ndarray, preprocessors: list, max_pixels: int) -> None:
        self.paths, self.needs, self.preprocessors, self.max_pixels = paths, needs, preprocessors, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, dict[int, Any], list[tuple]]:
        try:
            image = media.load_rgb(media.read_image_bytes(self.paths[i]), self.max_pixels)
        except FileNotFoundError as exc:
            return i, {}, [(-1, "missing_file", str(exc), False)]
        except media.ImageRejected as exc:
            return i, {}, [(-1, exc.reason, exc.detail, False)]
        except OSError as exc:
            return i, {}, [(-1, "unreadable_file", f"{type(exc).__name__}: {exc}", False)]
        items, failures = {}, []
        for k, preprocessor in enumerate(self.preprocessors):
            if self.needs[i, k]:
                item, failure = _safely(preprocessor, image)
                if failure:
                    failures.append((k, *failure))
                else:
                    items[k] = item
        return i, items, failures


def _collate(rows: list[tuple], preprocessors: list) -> dict[str, Any]:
    """Runs in the worker: per encoder, the positions it got and its collated batch."""
    per_encoder = {}
    for k, preprocessor in enumerate(preprocessors):
        got = [(i, items[k]) for i, items, _ in rows if k in items]
        if got:
            per_encoder[k] = ([i for i, _ in got], preprocessor.collate([item for _, item in got]))
    failures = [(i, *failure) for i, _, fails in rows for failure in fails]
    return {"positions": [r[0] for r in rows], "items": per_encoder, "failures": failures}


def _decode_workers(cfg: PipelineConfig, on_cuda: bool) -> int:
    if cfg.embed.decode_workers != "auto":
        return int(cfg.embed.decode_workers)
    cores = len(os.sched_getaffinity(0))
    return min(16, max(1, cores - 1)) if on_cuda else 0


def _decoded_batches(dataset: _DecodeRows, batch: int, workers: int, pin: bool, prefetch: int) -> Iterator[dict]:
    chunks = [list(range(i, min(i + batch, len(dataset)))) for i in range(0, len(dataset), batch)]
    collate = partial(_collate, preprocessors=dataset.preprocessors)
    if workers == 0:
        threads = len(os.sched_getaffinity(0))
        # In-process: decode a batch on every core (Pillow and numpy release the GIL), then let
        # the model have the cores; on CPU that beats decoding in parallel with the forward pass
        # (measured: ~0.91 of the forward-only rate against ~0.74 with one worker process).
        # This thread decodes one slice itself instead of waiting for the pool.
        with ThreadPoolExecutor(max_workers=max(1, threads - 1)) as pool:
            for chunk in chunks:
                step = -(-len(chunk) // threads)
                slices = [chunk[j : j + step] for j in range(0, len(chunk), step)]
                others = [pool.submit(lambda part: [dataset[i] for i in part], part) for part in slices[1:]]
                rows = [dataset[i] for i in slices[0]]
                for future in others:
                    rows += future.result()
                yield collate(rows)
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(
        dataset,
        batch_sampler=chunks,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=prefetch,
    )


def _encode_images(
    cfg: PipelineConfig,
    runs: list[_EncoderRun],
    shards: list[int],
    manifests: dict[int, dict[str, list]],
    works: dict[int, list[_ShardWork | None]],
    bar,
) -> None:
    # Rows any encoder still needs, in shard order; shards needing nothing finish at once.
    where: list[tuple[int, int]] = []
    needs_rows: list[list[bool]] = []
    for s in shards:
        todo = [set(w.todo) if w is not None else set() for w in works[s]]
        for row in range(len(manifests[s]["image_id"])):
            need = [row in t for t in todo]
            if any(need):
                where.append((s, row))
                needs_rows.append(need)
    remaining = Counter(s for s, _ in where)
    finished: set[int] = set()

    def finish_ready() -> None:
        for s in shards:
            if s not in finished and remaining[s] == 0:
                for work in works[s]:
                    if work is not None:
                        work.finish()
                finished.add(s)
                bar.update(len(manifests[s]["image_id"]))

    finish_ready()
    if not where:
        return
    devices = {getattr(run.encoder, "_device", "cpu") for run in runs}
    dataset = _DecodeRows(
        [manifests[s]["path"][row] for s, row in where],
        np.array(needs_rows, dtype=bool),
        [run.encoder.image_preprocessor() for run in runs],
        cfg.ingest.max_pixels,
    )
    batch = max(1, min(min(run.enc.batch_size for run in runs), 256))
    workers = _decode_workers(cfg, "cuda" in devices)
    for decoded in _decoded_batches(dataset, batch, workers, "cuda" in devices, cfg.embed.prefetch_batches):
        for position, k, reason, detail, unexpected in decoded["failures"]:
            s, row = where[position]
            for j, work in enumerate(works[s]):
                if work is not None and (k == -1 and dataset.needs[position, j] or k == j):
                    work.fail(row, reason, detail)
        for k, (positions, collated) in decoded["items"].items():
            # Split at shard boundaries: a forward batch never mixes shards.
            start = 0
            while start < len(positions):
                s = where[positions[start]][0]
                stop = start
                while stop < len(positions) and where[positions[stop]][0] == s:
                    stop += 1
                works[s][k].add([where[p][1] for p in positions[start:stop]], collated[start:stop])
                start = stop
        _check_not_broken(runs, decoded, dataset)
        remaining.subtract(where[p][0] for p in decoded["positions"])
        finish_ready()


def _check_not_broken(runs: list[_EncoderRun], decoded: dict, dataset: _DecodeRows) -> None:
    """Every item of a batch failing the same unexpected way is a broken encoder, not a bad corpus."""
    for k, run in enumerate(runs):
        needed = int(dataset.needs[decoded["positions"], k].sum())
        unexpected = [f for f in decoded["failures"] if f[1] == k and f[4]]
        if needed >= 8 and len(unexpected) == needed:
            raise RuntimeError(f"{run.stage}: every item of a batch failed to preprocess: {unexpected[0][3]}")


# -- precomputed vectors --------------------------------------------------------------------------


def _precomputed_mapping(cfg: PipelineConfig, layout: RunLayout, plan: ShardPlan, enc: EncoderConfig):
    from megapairs_ops.stages.embed.encoders import precomputed

    files = precomputed.inspect_source(enc)
    digest = precomputed.source_digest(enc, files)
    path = plan.dir / f"precomputed-{enc.name}-{digest}.parquet"
    stats_path = path.with_suffix(".json")
    if not stats_path.is_file():
        with atomic_path(path) as tmp:
            stats = precomputed.build_mapping(
                enc, files, layout.images, tmp, plan.shard_size, cfg.embed.memory_limit
            )
        write_json({**stats, "dim": files.dim, "source": digest}, stats_path)
    return files, path, read_json(stats_path)


def _run_precomputed(
    cfg: PipelineConfig, layout: RunLayout, plan: ShardPlan, enc: EncoderConfig, shards: range,
    pending: dict[str, list[int]],
) -> dict[str, int]:
    from megapairs_ops.stages.embed.encoders.precomputed import VectorReader

    files, mapping, source = _precomputed_mapping(cfg, layout, plan, enc)
    reader = VectorReader(files)
    status = {"fingerprint": encoder_fingerprint(cfg, enc), "identity": source["source"], "dim": files.dim}
    # The source's files changed since a shard was read (same config, new vectors): read it again.
    pending[enc.name] = [
        s for s in shards
        if not _shard_done(layout, enc.name, s, plan.digests[s], status["fingerprint"], status["identity"])
    ]
    totals: Counter = Counter()
    for s in pending[enc.name]:
        lo, hi = plan.rows(s)
        found = pq.read_table(mapping, filters=[("row", ">=", lo), ("row", "<", hi)]).to_pydict()
        at = {row - lo: (f, r) for row, f, r in zip(found["row"], found["file"], found["frow"])}
        problems = [
            (row, "no_precomputed_embedding", f"no vector for this image in {enc.precomputed.path}")
            if row not in at
            else (row, "ambiguous_precomputed_key", "this image's key also matches another image's vector")
            for row in range(hi - lo)
            if at.get(row, (-1, 0))[0] < 0
        ]
        rows = np.array([row for row in range(hi - lo) if at.get(row, (-1, 0))[0] >= 0], np.int64)
        raw = reader.gather(np.array([at[r][0] for r in rows], np.int64), np.array([at[r][1] for r in rows], np.int64))
        finite = np.isfinite(raw).all(axis=1)
        nonzero = np.abs(np.where(np.isfinite(raw), raw, 0)).sum(axis=1) > 0
        problems += [(int(r), "non_finite_embedding", "the precomputed vector holds NaN/inf") for r in rows[~finite]]
        problems += [(int(r), "zero_embedding", "the precomputed vector is all zeros") for r in rows[finite & ~nonzero]]
        good = finite & nonzero
        vectors = np.zeros((hi - lo, files.dim), np.float32)
        # clip-retrieval stores float16: normalised again in float32.
        vectors[rows[good]] = l2_normalise(raw[good])
        counts = {"reused": 0, "computed": 0, "read": int(good.sum())}
        _write_shard(layout, enc.name, s, plan.manifest(s), vectors, rows[good].tolist(), problems,
                     {"digest": plan.digests[s], **status, **counts})
        totals.update(counts)
    return dict(totals)


# ---------------------------------------------------------------------------------------------
# Finalize


def finalize_embed(
    cfg: PipelineConfig, layout: RunLayout, encoder_name: str, *, shard_size: int | None = None
) -> dict[str, Any]:
    """Stream the finished shards into vectors.npy / ids.parquet / the quarantine part; stats."""
    enc = cfg.encoder(encoder_name)
    stage = f"embed-{encoder_name}"
    plan = _ensure_plan(cfg, layout, shard_size)
    fingerprint = encoder_fingerprint(cfg, enc)
    missing = [s for s in range(plan.n_shards) if not _shard_done(layout, enc.name, s, plan.digests[s], fingerprint)]
    if missing:
        raise RuntimeError(
            f"{stage}: {len(missing)} of {plan.n_shards} shards are not embedded yet (first: {missing[0]}); "
            "run their work items (run_embed_work) first"
        )
    statuses = [_shard_status(layout, enc.name, s) for s in range(plan.n_shards)]
    identities = {s["identity"] for s in statuses}
    if len(identities) > 1:
        raise RuntimeError(
            f"{stage}: shards were embedded under {len(identities)} different encoder identities (weights, "
            "dtype or preprocessing changed between tasks, e.g. CPU and GPU workers); force the stage to redo it"
        )
    dims = {s["dim"] for s in statuses}
    dim = dims.pop() if dims else _dim_without_shards(cfg, layout, enc)
    total = sum(s["embedded"] for s in statuses)
    problems: list[dict[str, str]] = []
    ids_schema = pa.schema([("image_id", pa.string())])
    with (
        atomic_path(layout.embedding_vectors(enc.name)) as vec_tmp,
        atomic_path(layout.embedding_ids(enc.name)) as ids_tmp,
    ):
        if total == 0:
            with vec_tmp.open("wb") as fh:
                np.save(fh, np.zeros((0, dim), np.float32))
            out = None
        else:
            # open_memmap writes exactly the given file name (np.save would append ".npy").
            out = np.lib.format.open_memmap(vec_tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        with pq.ParquetWriter(ids_tmp, ids_schema, compression="zstd") as writer:
            row = 0
            for s in range(plan.n_shards):
                with np.load(_shard_file(layout, enc.name, s, "npz")) as part:
                    vectors = part["vectors"]
                    if out is not None and len(vectors):
                        out[row : row + len(vectors)] = vectors
                    row += len(vectors)
                    writer.write_table(pa.table({"image_id": part["ids"].tolist()}, schema=ids_schema))
                    quarantined = zip(*(part[key].tolist() for key in ("q_path", "q_reason", "q_detail")))
                    problems += [{"path": p, "reason": r, "detail": d, "stage": stage} for p, r, d in quarantined]
        if out is not None:
            out.flush()
            del out
    write_problem_rows(problems, QUARANTINE_SCHEMA, layout.quarantine_part(stage))
    stats: dict[str, Any] = {
        "images_in": plan.n_rows,
        "embedded": total,
        "quarantined": len(problems),
        "dim": dim,
        "encoder_kind": enc.kind,
        "model": enc.model,
        "reused": sum(s.get("reused", 0) for s in statuses),
        "computed": sum(s.get("computed", 0) for s in statuses),
        "shards": plan.n_shards,
        "identity": identities.pop() if identities else None,
    }
    if enc.kind == "precomputed":
        _, _, source_stats = _precomputed_mapping(cfg, layout, plan, enc)
        stats.update({k: v for k, v in source_stats.items() if k.startswith("precomputed_")})
    shutil.rmtree(_shards_dir(layout, enc.name), ignore_errors=True)
    return stats


def _dim_without_shards(cfg: PipelineConfig, layout: RunLayout, enc: EncoderConfig) -> int:
    """An empty corpus still gets a (0, dim) vectors.npy: the dim comes from the encoder itself."""
    if enc.kind == "precomputed":
        from megapairs_ops.stages.embed.encoders.precomputed import inspect_source

        return inspect_source(enc).dim
    return build_encoder(enc).dim


# ---------------------------------------------------------------------------------------------
# Single calls


def embed_corpus(
    cfg: PipelineConfig,
    encoder_name: str,
    layout: RunLayout,
    progress: bool = False,
    *,
    shard_size: int | None = None,
    encoders: dict[str, Encoder] | None = None,
) -> dict[str, Any]:
    """Embed every row of layout.images with the named encoder; see the module docstring."""
    return embed_corpus_multi(cfg, [encoder_name], layout, progress, shard_size=shard_size, encoders=encoders)[
        encoder_name
    ]


def embed_corpus_multi(
    cfg: PipelineConfig,
    encoder_names: Iterable[str],
    layout: RunLayout,
    progress: bool = False,
    *,
    shard_size: int | None = None,
    encoders: dict[str, Encoder] | None = None,
) -> dict[str, dict[str, Any]]:
    """Embed with several encoders in one call: image encoders of one resource class share one
    decode per image. Returns each encoder's stats (as embed_corpus). `encoders` may hold models
    already built from the same configs (notebooks, benchmarks), which are then not loaded again."""
    names = list(encoder_names)
    plan_embed_work(cfg, layout, names, shard_size=shard_size)
    plan = _ensure_plan(cfg, layout, shard_size)
    _run_shards(cfg, layout, plan, names, range(plan.n_shards), progress, encoders)
    return {name: finalize_embed(cfg, layout, name, shard_size=shard_size) for name in names}
