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


def _txt_to_parquet(path: Path, out: Path) -> Path:
    """A .txt ids file as a one-column Parquet, streamed (row order kept)."""
    import pyarrow.csv as pacsv

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=["key"], block_size=16 << 20),
        parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False),
        convert_options=pacsv.ConvertOptions(column_types={"key": pa.string()}),
    )
    with pq.ParquetWriter(out, pa.schema([("key", pa.string())])) as writer:
        for batch in reader:
            writer.write_batch(batch)
    return out


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def build_mapping(
    enc: EncoderConfig, files: PrecomputedFiles, images: Path, out: Path, row_group: int, memory_limit: str
) -> dict[str, Any]:
    """Write `out`: (row, file, file_row) per images.parquet row that has a vector, sorted by row;
    file = -1 marks an image whose key matched a vector another image also claims. Returns counts."""
    import duckdb

    src = enc.precomputed
    key_files = [
        _txt_to_parquet(k, out.with_name(f".{out.stem}-ids-{i}.parquet")) if k.suffix == ".txt" else k
        for i, k in enumerate(files.keys)
    ]
    column = "key" if files.keys[0].suffix == ".txt" else src.key_column
    image_columns = pq.read_schema(images).names
    image_key = {"image_id": "image_id", "sha256": "sha256" if "sha256" in image_columns else "image_id"}
    if src.match_on in image_key:
        image_keys = f"SELECT file_row_number AS row, {image_key[src.match_on]} AS k FROM images"
    else:
        paths = "SELECT file_row_number AS row, path AS k FROM images"
        if "duplicate_paths" in image_columns:
            paths += " UNION ALL SELECT file_row_number AS row, unnest(duplicate_paths) AS k FROM images"
        if src.match_on == "key":
            # img2dataset keys: a tar member or a file name without its extension.
            stem = "regexp_replace(CASE WHEN k LIKE '%.tar#%' THEN regexp_extract(k, '\\.tar#(.*)$', 1) ELSE regexp_extract(k, '[^/]+$') END, '\\.[^./]*$', '')"
            image_keys = f"SELECT row, {stem} AS k FROM ({paths})"
        else:
            image_keys = paths
    source_key = f"CAST({_quote_ident(column)} AS VARCHAR)"
    if src.match_on == "path" and src.path_root:
        root = str(Path(src.path_root).expanduser().resolve()).rstrip("/")
        source_key = (
            f"CASE WHEN starts_with({source_key}, '/') THEN {source_key} "
            f"ELSE {_sql_literal(root + '/')} || regexp_replace({source_key}, '^(\\./)+', '') END"
        )
    file_index = pa.table({"filename": [str(p) for p in key_files], "file": list(range(len(key_files)))})
    with duckdb.connect() as con:
        con.execute(f"SET memory_limit = {_sql_literal(memory_limit)}")
        con.execute(f"SET temp_directory = {_sql_literal(str(out.parent / '.duckdb-spill'))}")
        con.register("file_index", file_index)
        con.execute(f"CREATE VIEW images AS SELECT * FROM read_parquet({_sql_literal(str(images))}, file_row_number = true)")
        con.execute(
            f"""
            CREATE TEMP TABLE src AS
            SELECT f.file, s.file_row_number AS frow, {source_key} AS k
            FROM read_parquet(?, filename = true, file_row_number = true) AS s JOIN file_index AS f USING (filename)
            """,
            [[str(p) for p in key_files]],
        )
        con.execute(f"CREATE TEMP TABLE image_keys AS SELECT DISTINCT row, k FROM ({image_keys}) WHERE k IS NOT NULL")
        con.execute(
            """
            CREATE TEMP TABLE matched AS
            WITH first_src AS (
                SELECT k, arg_min(file, (file, frow)) AS file, arg_min(frow, (file, frow)) AS frow
                FROM src WHERE k IS NOT NULL GROUP BY k
            ),
            per_row AS (  -- an image reachable by several keys (duplicate paths) takes its first vector
                SELECT i.row, arg_min(s.file, (s.file, s.frow)) AS file, arg_min(s.frow, (s.file, s.frow)) AS frow
                FROM image_keys AS i JOIN first_src AS s USING (k) GROUP BY i.row
            )
            SELECT row, file, frow, count(*) OVER (PARTITION BY file, frow) AS claims FROM per_row
            """
        )
        source_rows, duplicates, ignored = con.execute(
            """
            SELECT count(*), count(k) - count(DISTINCT k),
                   count(*) FILTER (WHERE k IS NULL OR k NOT IN (SELECT k FROM image_keys))
            FROM src
            """
        ).fetchone()
        matched, ambiguous = con.execute(
            "SELECT count(*) FILTER (WHERE claims = 1), count(*) FILTER (WHERE claims > 1) FROM matched"
        ).fetchone()
        con.execute(
            f"""
            COPY (SELECT row, CASE WHEN claims = 1 THEN file ELSE -1 END::INTEGER AS file, frow
                  FROM matched ORDER BY row)
            TO {_sql_literal(str(out))} (FORMAT parquet, ROW_GROUP_SIZE {int(row_group)})
            """
        )
    for path in key_files:
        if path.name.startswith(f".{out.stem}-ids-"):
            path.unlink(missing_ok=True)
    return {
        "precomputed_rows": int(source_rows),
        "precomputed_matched_images": int(matched),
        # Rows whose key names no image of this corpus: ignored, as the issue asks, but counted.
        "precomputed_ignored_rows": int(ignored),
        "precomputed_duplicate_rows": int(duplicates),
        "precomputed_ambiguous_images": int(ambiguous),
    }


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
