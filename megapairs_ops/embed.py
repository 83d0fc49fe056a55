"""Embed stage: one encoder over every image (or caption) in ingest/images.parquet.

Output: embeddings/{enc}/vectors.npy (float32, unit rows) aligned row for row with ids.parquet, and
quarantine/embed-{enc}.parquet for the items this view could not encode (always written).

The corpus is processed in fixed chunks of rows. Each finished chunk is saved as a part under a
directory keyed by everything that decides its content (encoder identity, the images file, the
batching), so a killed task resumes at the first missing chunk and a changed input starts over.
Memory stays bounded: one batch of prepared items is alive at a time, and the final vectors are
streamed part by part into a memory-mapped file that is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops import media
from megapairs_ops.config import PipelineConfig
from megapairs_ops.encoders import EncodeInputError, Encoder, build_encoder
from megapairs_ops.storage import QUARANTINE_SCHEMA, RunLayout, atomic_path, write_problem_rows

# Rows per resumable part: large enough that per-part overhead is noise, small enough that a
# killed task loses minutes, not hours.
DEFAULT_CHUNK_ROWS = 16_384
_COLUMNS = ["image_id", "path", "caption"]
_EXPECTED_FAILURES = (EncodeInputError, media.ImageRejected)


def _iter_chunks(path: Path, chunk_rows: int) -> Iterator[dict[str, list]]:
    """Rows of images.parquet in consecutive chunks of exactly `chunk_rows` (the last may be short)."""
    buffer: dict[str, list] = {c: [] for c in _COLUMNS}
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=_COLUMNS):
        for column in _COLUMNS:
            buffer[column].extend(batch.column(column).to_pylist())
        while len(buffer["image_id"]) >= chunk_rows:
            yield {c: v[:chunk_rows] for c, v in buffer.items()}
            buffer = {c: v[chunk_rows:] for c, v in buffer.items()}
    if buffer["image_id"]:
        yield buffer


class _Prepare:
    """Turns one row into the encoder's per-item input, or raises an expected failure."""

    def __init__(self, encoder: Encoder, max_pixels: int) -> None:
        self.encoder = encoder
        self.max_pixels = max_pixels

    def __call__(self, row: tuple[str, str | None]) -> Any:
        path, caption = row
        if self.encoder.modality == "text":
            return self.encoder.prepare_text(caption or "")
        try:
            data = media.read_image_bytes(path)
        except FileNotFoundError as exc:
            raise EncodeInputError("missing_file", str(exc)) from None
        except OSError as exc:
            raise EncodeInputError("unreadable_file", f"{type(exc).__name__}: {exc}") from None
        return self.encoder.prepare_image(media.load_rgb(data, self.max_pixels))


def _prepare_safely(prepare: _Prepare, row: tuple[str, str | None]) -> tuple[Any, Any, bool]:
    """(item, None, _) on success; (None, (reason, detail), unexpected) on failure."""
    try:
        return prepare(row), None, False
    except _EXPECTED_FAILURES as exc:
        return None, (exc.reason, exc.detail), False
    except Exception as exc:  # noqa: BLE001 - an odd input must not take the run down
        return None, ("preprocess_failed", f"{type(exc).__name__}: {exc}"), True


def _prepare_all(prepare: _Prepare, rows: list, pool: ThreadPoolExecutor, workers: int) -> list:
    if workers < 2 or len(rows) < 2:
        return [_prepare_safely(prepare, row) for row in rows]
    # One contiguous slice per worker: per-item futures cost more than the features of a small image.
    step = -(-len(rows) // workers)
    slices = [rows[i : i + step] for i in range(0, len(rows), step)]
    done = pool.map(lambda part: [_prepare_safely(prepare, row) for row in part], slices)
    return [result for part in done for result in part]


def _encode_chunk(
    encoder: Encoder,
    chunk: dict[str, list],
    prepare: _Prepare,
    batch_size: int,
    pool: ThreadPoolExecutor,
    workers: int,
    stage: str,
    tick,
) -> dict[str, np.ndarray]:
    vectors: list[np.ndarray] = []
    ids: list[str] = []
    problems: list[tuple[int, str, str, str]] = []  # (row in chunk, path, reason, detail)
    n = len(chunk["image_id"])
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        rows = list(zip(chunk["path"][start:stop], chunk["caption"][start:stop]))
        results = _prepare_all(prepare, rows, pool, workers)
        unexpected = [r[1] for r in results if r[2]]
        if len(rows) >= 8 and len(unexpected) == len(rows):
            # Every item failing the same unexpected way is a broken encoder, not a bad corpus.
            raise RuntimeError(f"{stage}: every item of a batch failed to preprocess: {unexpected[0][1]}")
        good = [i for i, (_, failure, _) in enumerate(results) if failure is None]
        for i, (_, failure, _) in enumerate(results):
            if failure is not None:
                problems.append((start + i, rows[i][0], *failure))
        if good:
            out = encoder.encode_prepared([results[i][0] for i in good])
            if out.shape != (len(good), encoder.dim):
                expected = (len(good), encoder.dim)
                raise RuntimeError(f"{stage}: encoder returned shape {out.shape}, expected {expected}")
            finite = np.isfinite(out).all(1)
            for i, ok in zip(good, finite):
                if ok:
                    ids.append(chunk["image_id"][start + i])
                else:
                    problems.append((start + i, rows[i][0], "non_finite_embedding", "encoder output NaN/inf"))
            vectors.append(out[finite].astype(np.float32, copy=False))
        tick(len(rows))
    problems.sort()
    _, paths, reasons, details = (list(col) for col in zip(*problems)) if problems else ([], [], [], [])
    return {
        "vectors": np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32),
        "ids": np.array(ids, dtype=str),
        "q_path": np.array(paths, dtype=str),
        "q_reason": np.array(reasons, dtype=str),
        "q_detail": np.array(details, dtype=str),
    }


def _parts_key(
    cfg: PipelineConfig, encoder: Encoder, images: Path, chunk_rows: int, batch_size: int
) -> str:
    st = images.stat()
    payload = {
        "identity": encoder.identity,
        "images": [str(images), st.st_size, st.st_mtime_ns],
        "chunk_rows": chunk_rows,
        "batch_size": batch_size,
        "max_pixels": cfg.ingest.max_pixels,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_part(part: dict[str, np.ndarray], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **part)


def _assemble(parts: list[Path], dim: int, layout: RunLayout, name: str, stage: str) -> tuple[int, int]:
    """Stream the parts into vectors.npy, ids.parquet and the quarantine part; (embedded, quarantined)."""
    counts = []
    for path in parts:
        with np.load(path) as part:
            counts.append(len(part["ids"]))
    total = sum(counts)
    problems: list[dict[str, str]] = []
    ids_schema = pa.schema([("image_id", pa.string())])
    with (
        atomic_path(layout.embedding_vectors(name)) as vec_tmp,
        atomic_path(layout.embedding_ids(name)) as ids_tmp,
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
            for path in parts:
                with np.load(path) as part:
                    vectors = part["vectors"]
                    if out is not None and len(vectors):
                        out[row : row + len(vectors)] = vectors
                    row += len(vectors)
                    writer.write_table(pa.table({"image_id": part["ids"].tolist()}, schema=ids_schema))
                    quarantined = zip(*(part[key].tolist() for key in ("q_path", "q_reason", "q_detail")))
                    problems += [
                        {"path": p, "reason": r, "detail": d, "stage": stage} for p, r, d in quarantined
                    ]
        if out is not None:
            out.flush()
            del out
    write_problem_rows(problems, QUARANTINE_SCHEMA, layout.quarantine_part(stage))
    return total, len(problems)


def embed_corpus(
    cfg: PipelineConfig,
    encoder_name: str,
    layout: RunLayout,
    progress: bool = False,
    *,
    chunk_rows: int | None = None,
) -> dict[str, Any]:
    """Embed every row of layout.images with the named encoder; see the module docstring."""
    enc = cfg.encoder(encoder_name)
    stage = f"embed-{encoder_name}"
    images = layout.images
    if not images.is_file():
        raise FileNotFoundError(f"{stage}: {images} not found; run the ingest stage first")
    encoder = build_encoder(enc)
    n = pq.ParquetFile(images).metadata.num_rows
    chunk_rows = chunk_rows or max(enc.batch_size, DEFAULT_CHUNK_ROWS)

    out_dir = layout.embedding_dir(encoder_name)
    parts_dir = out_dir / f".parts-{_parts_key(cfg, encoder, images, chunk_rows, enc.batch_size)}"
    if out_dir.is_dir():
        # Leftovers of a killed run: parts made under other inputs/settings, and half-written temps.
        for stale in out_dir.glob(".parts-*"):
            if stale != parts_dir:
                shutil.rmtree(stale, ignore_errors=True)
        for stale in out_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    parts_dir.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=stage, unit="img", disable=not progress)
    prepare = _Prepare(encoder, cfg.ingest.max_pixels)
    parts: list[Path] = []
    # Decoding and feature extraction release the GIL in Pillow/numpy, so threads overlap them.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, chunk in enumerate(_iter_chunks(images, chunk_rows)):
            part_path = parts_dir / f"part-{index:06d}.npz"
            parts.append(part_path)
            if part_path.is_file():
                bar.update(len(chunk["image_id"]))
                continue
            part = _encode_chunk(encoder, chunk, prepare, enc.batch_size, pool, workers, stage, bar.update)
            _save_part(part, part_path)
    bar.close()

    embedded, quarantined = _assemble(parts, encoder.dim, layout, encoder_name, stage)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return {
        "images_in": n,
        "embedded": embedded,
        "quarantined": quarantined,
        "dim": encoder.dim,
        "encoder_kind": enc.kind,
        "model": enc.model,
    }
