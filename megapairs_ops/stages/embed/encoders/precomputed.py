"""The `precomputed` kind: vectors a team already has, read instead of computed.

Two layouts:
- clip-retrieval's output folder: img_emb/img_emb_<n>.npy (or text_emb/text_emb_<n>.npy) with
  metadata/metadata_<n>.parquet, row i of a metadata part describing row i of its .npy part
  (clip-retrieval writes float16 vectors; they are re-normalised in float32 here);
- one .npy of (n, dim) plus an ids file (Parquet with the key column, or .txt one key per line).

Each vector row is matched to an image of images.parquet by `precomputed.match_on`; rows whose
image is not in the corpus are ignored (counted), images without a vector are quarantined.
Matching is a DuckDB join over the key columns only; vectors stay memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import ConfigError, EncoderConfig


class PrecomputedError(ConfigError):
    """The precomputed vectors do not fit together (counts, dimensions, columns); one line."""


@dataclass(frozen=True)
class PrecomputedFiles:
    vectors: list[Path]
    keys: list[Path]  # per vectors file: a metadata part or the ids file
    counts: list[int]
    dim: int


def _fail(enc: EncoderConfig, problem: str) -> PrecomputedError:
    return PrecomputedError(f"encoder '{enc.name}': precomputed: {problem}")


def _part_number(path: Path) -> str | None:
    match = re.search(r"(\d+)$", path.stem)
    return match.group(1) if match else None


def inspect_source(enc: EncoderConfig) -> PrecomputedFiles:
    """The vector and key files, checked against each other; raises PrecomputedError."""
    src = enc.precomputed
    root = Path(src.path).expanduser()
    if root.is_file():
        vectors, keys = [root], [Path(src.ids).expanduser()]
    else:
        folder = root / ("img_emb" if src.embeddings == "image" else "text_emb")
        vectors = sorted(folder.glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
        if not vectors:
            raise _fail(enc, f"no .npy files in {folder}")
        metadata = {_part_number(p): p for p in (root / "metadata").glob("*.parquet")}
        keys = []
        for path in vectors:
            part = metadata.get(_part_number(path))
            if part is None:
                raise _fail(enc, f"{path.name} has no metadata part (expected metadata/metadata_{_part_number(path)}.parquet)")
            keys.append(part)
    counts, dims = [], set()
    for vec_path, key_path in zip(vectors, keys):
        try:
            array = np.load(vec_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise _fail(enc, f"{vec_path.name} is not a readable .npy ({exc})") from None
        if array.ndim != 2 or array.dtype.kind != "f":
            raise _fail(enc, f"{vec_path.name} holds {array.dtype} of shape {array.shape}; expected float (n, dim)")
        rows = _key_rows(enc, key_path)
        if rows != array.shape[0]:
            raise _fail(enc, f"count mismatch: {vec_path.name} has {array.shape[0]} vectors, {key_path.name} {rows} keys")
        counts.append(int(array.shape[0]))
        dims.add(int(array.shape[1]))
    if len(dims) > 1:
        raise _fail(enc, f"dimension mismatch between files: {sorted(dims)}")
    dim = dims.pop()
    if "dim" in enc.model_fields_set and enc.dim != dim:
        raise _fail(enc, f"dimension mismatch: vectors have {dim} dimensions, the config says dim {enc.dim}")
    return PrecomputedFiles(vectors, keys, counts, dim)


def _key_rows(enc: EncoderConfig, key_path: Path) -> int:
    if key_path.suffix == ".txt":
        with key_path.open("rb") as fh:
            return sum(1 for _ in fh)
    schema = pq.read_schema(key_path)
    if enc.precomputed.key_column not in schema.names:
        raise _fail(
            enc,
            f"{key_path.name} has no column '{enc.precomputed.key_column}' (columns: {schema.names}); "
            "set precomputed.column or match_on",
        )
    return pq.ParquetFile(key_path).metadata.num_rows


def source_digest(enc: EncoderConfig, files: PrecomputedFiles) -> str:
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files.vectors + files.keys]
    payload = json.dumps([enc.precomputed.model_dump(), stamp], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _keys_to_parquet(path: Path, column: str | None, out: Path) -> Path:
    """One key file as a one-column Parquet (`key`, string), streamed, row order kept: a .txt
    file (one key per line) or the key column of a metadata or ids Parquet."""
    schema = pa.schema([("key", pa.string())])
    with pq.ParquetWriter(out, schema) as writer:
        if path.suffix == ".txt":
            import pyarrow.csv as pacsv

            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(column_names=["key"], block_size=16 << 20),
                parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False),
                convert_options=pacsv.ConvertOptions(column_types={"key": pa.string()}),
            )
            batches = (batch for batch in reader)
        else:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=[column])
        for batch in batches:
            writer.write_table(pa.table({"key": batch.column(0).cast(pa.string())}, schema=schema))
    return out


def _images_to_parquet(images: Path, out: Path) -> Path:
    """The key columns of images.parquet (image_id, sha256, path, duplicate_paths), streamed; a
    table written without sha256 or duplicate_paths gets image_id and no duplicates instead."""
    names = pq.read_schema(images).names
    schema = pa.schema([("image_id", pa.string()), ("sha256", pa.string()), ("path", pa.string()),
                        ("duplicate_paths", pa.list_(pa.string()))])
    wanted = [c for c in schema.names if c in names]
    with pq.ParquetWriter(out, schema) as writer:
        for batch in pq.ParquetFile(images).iter_batches(batch_size=1 << 16, columns=wanted):
            n = batch.num_rows
            cols = {
                "image_id": batch.column("image_id"),
                "sha256": batch.column("sha256") if "sha256" in names else batch.column("image_id"),
                "path": batch.column("path") if "path" in names else pa.nulls(n, pa.string()),
                "duplicate_paths": (batch.column("duplicate_paths") if "duplicate_paths" in names
                                    else pa.array([[]] * n, pa.list_(pa.string()))),
            }
            writer.write_table(pa.table(cols, schema=schema))
    return out


def build_mapping(
    enc: EncoderConfig, files: PrecomputedFiles, images: Path, out: Path, row_group: int, db_settings: dict[str, Any]
) -> dict[str, Any]:
    """Write `out`: (row, file, file_row) per images.parquet row that has a vector, sorted by row;
    file = -1 marks an image whose key matched a vector another image also claims. Returns counts.
    The join runs in DuckDB (sql/precomputed_*.sql) over the key columns only."""

    from megapairs_ops.db import open_session, sql

    src = enc.precomputed
    scratch = out.parent
    key_files = [
        _keys_to_parquet(k, None if k.suffix == ".txt" else src.key_column, scratch / f".{out.stem}-keys-{i}.parquet")
        for i, k in enumerate(files.keys)
    ]
    image_keys = _images_to_parquet(images, scratch / f".{out.stem}-images.parquet")
    # clip-retrieval writes paths as given on its command line: relative ones are taken from here.
    root = str(Path(src.path_root).expanduser().resolve()).rstrip("/") + "/" if src.path_root else None
    path_root = root if src.match_on == "path" else None
    file_index = pa.table({"filename": [str(p) for p in key_files], "file": list(range(len(key_files)))})
    try:
        with open_session({**db_settings, "preserve_insertion_order": False}) as con:
            con.register("file_index", file_index)
            con.execute(sql("precomputed_source_keys"), {"key_files": [str(p) for p in key_files], "path_root": path_root})
            con.execute(sql("precomputed_image_keys"), {"images": str(image_keys), "match_on": src.match_on})
            con.execute(sql("precomputed_matched"))
            source_rows, duplicates, ignored = con.execute(sql("precomputed_source_counts")).fetchall()[0]
            matched, ambiguous = con.execute(sql("precomputed_matched_counts")).fetchall()[0]
            reader = con.sql(sql("precomputed_mapping")).to_arrow_reader(row_group)
            with pq.ParquetWriter(out, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch, row_group_size=row_group)
    finally:
        for path in [*key_files, image_keys]:
            path.unlink(missing_ok=True)
    return {
        "precomputed_rows": int(source_rows),
        "precomputed_matched_images": int(matched),
        # Rows whose key names no image of this corpus: ignored, as the issue asks, but counted.
        "precomputed_ignored_rows": int(ignored),
        "precomputed_duplicate_rows": int(duplicates),
        "precomputed_ambiguous_images": int(ambiguous),
    }


class VectorReader:
    """Gathers rows of the precomputed .npy files (memory-mapped) as unit float32 vectors."""

    def __init__(self, files: PrecomputedFiles) -> None:
        self._paths = files.vectors
        self._open: dict[int, np.ndarray] = {}
        self.dim = files.dim

    def gather(self, file_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), np.float32)
        for file_id in np.unique(file_ids):
            if file_id not in self._open:
                self._open[file_id] = np.load(self._paths[file_id], mmap_mode="r")
            where = np.flatnonzero(file_ids == file_id)
            order = where[np.argsort(rows[where], kind="stable")]
            out[order] = self._open[file_id][rows[order]]
        return out
