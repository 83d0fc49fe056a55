"""Content-addressed embedding cache: (item content hash, encoder identity) -> vector.

Layout under the cache root, one folder per encoder identity (the hash of everything that decides
a vector: kind, model, revision, weights digest, dtype, preprocessing):

    <root>/<identity-hash>/identity.json        the identity itself, for people
    <root>/<identity-hash>/seg-<id>.npy         float32 (n, dim) vectors of one written batch
    <root>/<identity-hash>/seg-<id>.keys.parquet  key per row (image sha256 or caption sha256)

Segments are append-only and uniquely named; the keys file is renamed into place after the
vectors, so a segment is visible only once complete. That makes concurrent writers (mapped
tasks on several GPU workers, overlapping runs) safe on any shared filesystem without locks.
Lookups run in DuckDB over the keys files (only the key column is read, never the vectors), and
hits are gathered from memory-mapped segments, so neither side needs the cache in RAM.
Deleting an identity folder (or the whole root) is always safe: entries are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from megapairs_ops.db import open_session, sql
from megapairs_ops.storage import atomic_path, sweep_temps, write_json, write_parquet

CACHE_VERSION = "1"
STALE_TEMP_S = 24 * 3600
_KEYS_SCHEMA = pa.schema([("key", pa.string())])


def identity_hash(identity: dict[str, Any]) -> str:
    payload = json.dumps({"cache_version": CACHE_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingCache:
    def __init__(self, root: Path, identity: dict[str, Any], dim: int, db_settings: dict[str, Any] | None = None) -> None:
        self.dir = Path(root).expanduser() / identity_hash(identity)
        self.dim = dim
        # DuckDB settings of the lookups (db.session_settings); the spill folder is the cache's own.
        self.db_settings = {**(db_settings or {}), "temp_directory": str(self.dir / ".duckdb-spill")}
        self.dir.mkdir(parents=True, exist_ok=True)
        # Temp files of writers killed mid-segment; other runs may be writing right now, so only
        # those a day old, far beyond any one segment write.
        sweep_temps(self.dir, min_age_s=STALE_TEMP_S)
        if not (self.dir / "identity.json").is_file():
            write_json(identity, self.dir / "identity.json")

    def _segments(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("seg-*.keys.parquet") if self._vectors_of(p).is_file())

    @staticmethod
    def _vectors_of(keys_file: Path) -> Path:
        return keys_file.with_name(keys_file.name.removesuffix(".keys.parquet") + ".npy")

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        """key -> (segment file name, row) for the keys the cache holds with a readable segment."""
        segments = self._segments()
        if not keys or not segments:
            return {}

        wanted = pa.table({"key": pa.array(sorted(set(keys)), pa.string())})
        with open_session(self.db_settings) as con:
            con.register("wanted", wanted)
            # Two segments may hold one key (two runs computed it at once): any copy serves; the
            # first by name keeps the choice stable.
            rows = con.execute(sql("embed_cache_lookup"), {"segments": [str(p) for p in segments]}).fetchall()
        usable = {name: self._segment_ok(Path(name)) for name in {r[1] for r in rows}}
        return {key: (Path(name).name, int(row)) for key, name, row in rows if usable[name]}

    def _segment_ok(self, keys_file: Path) -> bool:
        try:
            vectors = np.load(self._vectors_of(keys_file), mmap_mode="r")
        except (OSError, ValueError):
            return False
        return vectors.ndim == 2 and vectors.shape[1] == self.dim and vectors.dtype == np.float32

    def read(self, hits: list[tuple[str, int]]) -> np.ndarray:
        """The vectors of `hits` (as returned by lookup), in the given order."""
        out = np.empty((len(hits), self.dim), np.float32)
        by_segment: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for position, (segment, row) in enumerate(hits):
            by_segment[segment].append((position, row))
        for segment, wanted in by_segment.items():
            vectors = np.load(self._vectors_of(self.dir / segment), mmap_mode="r")
            positions, rows = (np.array(col) for col in zip(*wanted))
            order = np.argsort(rows, kind="stable")  # ascending rows read the memmap sequentially
            out[positions[order]] = vectors[rows[order]]
        return out

    def write(self, keys: list[str], vectors: np.ndarray) -> str | None:
        """Add one segment; returns its name (None when there is nothing to add)."""
        if not keys:
            return None
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"cache write: {vectors.shape} vectors for {len(keys)} keys of dim {self.dim}")
        name = f"seg-{uuid.uuid4().hex}"
        with atomic_path(self.dir / f"{name}.npy") as tmp, tmp.open("wb") as fh:
            np.save(fh, vectors)
        write_parquet(pa.table({"key": keys}, schema=_KEYS_SCHEMA), self.dir / f"{name}.keys.parquet")
        return name
