"""Per-record checkpoints of the annotate stage.

Every finished (pair, step) outcome — accepted output, or failure after this run's tries — is a
record keyed by (pair_id, step, prompt_version, model). Records are appended in small Parquet
parts, each written atomically (temp + rename), under one folder per pair-id prefix (the first two
hex digits: 256 shards), so a work item reads only its own shards and a killed task loses at most
the records not yet flushed. When several records share a key the newest wins; a finished work
item compacts its shards to one part each.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.schemas import ANNOTATION_RECORD_SCHEMA
from megapairs_ops.storage import write_parquet

RECORD_SCHEMA = ANNOTATION_RECORD_SCHEMA

Key = tuple[str, str, str, str]
_SAFE = re.compile(r"^[0-9A-Za-z]{2}$")


def prefix_of(pair_id: str) -> str:
    return pair_id[:2]


def shard_name(prefix: str) -> str:
    """A folder name for a pair-id prefix (hex ids: the prefix itself)."""
    return prefix if _SAFE.match(prefix) else "x" + prefix.encode("utf-8").hex()


def record_key(row: dict[str, Any]) -> Key:
    return (row["pair_id"], row["step"], row["prompt_version"], row["model"])


class RecordStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def shard_dir(self, prefix: str) -> Path:
        return self.root / shard_name(prefix)

    def parts(self, prefix: str) -> list[Path]:
        folder = self.shard_dir(prefix)
        return sorted(folder.glob("*.parquet")) if folder.is_dir() else []

    def load(self, prefixes: Iterable[str]) -> dict[Key, dict[str, Any]]:
        """The newest record per key in these shards."""
        latest: dict[Key, dict[str, Any]] = {}
        for prefix in prefixes:
            for part in self.parts(prefix):
                try:
                    rows = pq.read_table(part, schema=RECORD_SCHEMA).to_pylist()
                except (OSError, pa.ArrowInvalid):
                    continue  # only a foreign file can be half-written: parts are renamed into place
                for row in rows:
                    key = record_key(row)
                    old = latest.get(key)
                    if old is None or row["created_ns"] >= old["created_ns"]:
                        latest[key] = row
        return latest

    def compact(self, prefix: str) -> None:
        """Rewrite a shard as one part holding only the newest record per key."""
        parts = self.parts(prefix)
        if len(parts) <= 1:
            return
        rows = sorted(self.load([prefix]).values(), key=lambda r: (r["pair_id"], r["step"], r["created_ns"]))
        write_parquet(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), self.shard_dir(prefix) / _part_name("c"))
        # A crash before these unlinks leaves duplicates of identical records: harmless.
        for part in parts:
            part.unlink(missing_ok=True)


_SEQ = 0


def _part_name(kind: str) -> str:
    global _SEQ
    _SEQ += 1
    # Time first, so sorted names are in write order.
    return f"{time.time_ns():020d}-{kind}-{os.getpid()}-{_SEQ:06d}.parquet"


class RecordWriter:
    """Buffers records and commits them in small atomic parts: every `every` records or
    `interval_s` seconds, whichever comes first (`maybe_flush` is called as records arrive and
    by a timer)."""

    def __init__(self, store: RecordStore, every: int, interval_s: float) -> None:
        self.store = store
        self.every = every
        self.interval_s = interval_s
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.n_pending = 0
        self.last_flush = time.monotonic()
        self.parts_written = 0
        self.records_written = 0

    def add(self, row: dict[str, Any]) -> None:
        row.setdefault("created_ns", time.time_ns())
        self.pending.setdefault(prefix_of(row["pair_id"]), []).append(row)
        self.n_pending += 1
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if self.n_pending >= self.every or (self.n_pending and time.monotonic() - self.last_flush >= self.interval_s):
            self.flush()

    def flush(self) -> None:
        for prefix, rows in sorted(self.pending.items()):
            table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
            write_parquet(table, self.store.shard_dir(prefix) / _part_name("r"))
            self.parts_written += 1
            self.records_written += len(rows)
        self.pending.clear()
        self.n_pending = 0
        self.last_flush = time.monotonic()
