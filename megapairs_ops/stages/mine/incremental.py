"""Incremental mining: a run over a grown corpus reuses an earlier run's retrieved sets.

The exact retrieved set of a query q is the top k of the corpus without q. When an earlier run
(the parent) mined a corpus P exactly with the same k, and this run's corpus R shares images with
identical vectors, then for a shared query q whose parent top k holds no image that left the
corpus (or whose vector changed),

    top_k(R - q) = top_k(parent top_k(q)  +  top_k(new images))

so only the new images are searched for it. Every other query (new images, changed vectors, and
old queries whose parent list lost an image) is searched against the whole corpus. The result
equals a full recompute (up to ties among equal similarities). Only the exact index qualifies:
an approximate parent list is not the true top k, and neither would the merge be.

The parent is a published dataset version under the same output root (a sibling run directory
whose manifest.json names it; catalogue.record_version writes it), newest published_at first.
Each finished mining writes neighbours/{enc}.json describing its neighbours file (k, exactness, and
the size and mtime of the neighbours, vectors and ids files it came from); the first version whose
record matches its files, this run's k and dimension, and the encoder identity (when both embed
stages recorded one) is the parent. Unpublished runs are never parents: a run that stopped at a
gate, or a scratch directory that happens to sit beside the partitions, is no dataset version. Its vectors are compared bit for bit with this run's for every
shared image id, so a changed caption or model shows up as a changed vector, never as a stale list.

`prepare` writes everything the work items need into one folder of the encoder's mining work
(the parent is not read again after it): kind.npy (per query row: 1 reuses its parent list, 0 is
searched against the whole corpus), reused_rows.npy with parent_t.npy / parent_sim.npy (parent
lists in this run's row numbers), new_rows.npy and new_vectors.npy (the images old queries are
searched against). The SQL is in sql/mine_*.sql.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from megapairs_ops.config import MiningConfig
from megapairs_ops.db import open_session, sql
from megapairs_ops.layout import RunLayout
from megapairs_ops.stages.mine.index import VectorFile
from megapairs_ops.storage import load_status, read_json, write_json

log = logging.getLogger("megapairs")

# Bumped when the meaning of neighbours/{enc}.json changes: older records never qualify a parent.
META_VERSION = "1"
# Sentinel in parent_t: the parent's neighbour left the corpus or changed its vector.
GONE = -2


class NoIncremental(Exception):
    """Why this run mines in full; the message is recorded in the stage's stats."""


def stamp(path: Path) -> list[int]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def meta_path(layout: RunLayout, encoder: str) -> Path:
    return layout.neighbours_meta(encoder)


def embed_identity(layout: RunLayout, encoder: str) -> str | None:
    return (load_status(layout, f"embed-{encoder}") or {}).get("identity")


def write_meta(layout: RunLayout, encoder: str, *, k: int, exact: bool, code_version: str, dim: int) -> None:
    """Describe a just-finalized neighbours file, so a later run can take it as its parent."""
    n = pq.ParquetFile(layout.embedding_ids(encoder)).metadata.num_rows
    write_json({
        "meta_version": META_VERSION,
        "code_version": code_version,
        "k": k,
        "exact": exact,
        "n": n,
        "dim": dim,
        "neighbour_rows": pq.ParquetFile(layout.neighbours(encoder)).metadata.num_rows,
        "identity": embed_identity(layout, encoder),
        "vectors": stamp(layout.embedding_vectors(encoder)),
        "ids": stamp(layout.embedding_ids(encoder)),
        "neighbours": stamp(layout.neighbours(encoder)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, meta_path(layout, encoder))


@dataclass(frozen=True)
class Parent:
    layout: RunLayout
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return self.layout.root.name

    def describe(self) -> dict[str, Any]:
        return {"run_dir": str(self.layout.root), "version": self.version, "meta": self.meta}


def _rejection(parent: RunLayout, meta: dict, encoder: str, k: int, dim: int, code_version: str,
               identity: str | None) -> str | None:
    """Why a sibling's neighbours cannot serve as the parent (None: they can)."""
    if meta.get("meta_version") != META_VERSION or meta.get("code_version") != code_version:
        return "mined by another code version"
    if not meta.get("exact"):
        return "mined with an approximate index"
    if meta.get("k") != k:
        return f"mined with k={meta.get('k')}, this run has k={k}"
    if meta.get("dim") != dim:
        return f"vectors of dimension {meta.get('dim')}, this run's have {dim}"
    if identity and meta.get("identity") and identity != meta["identity"]:
        return "embedded under another encoder identity"
    try:
        stamps = {key: stamp(path) for key, path in (("vectors", parent.embedding_vectors(encoder)),
                                                     ("ids", parent.embedding_ids(encoder)),
                                                     ("neighbours", parent.neighbours(encoder)))}
    except OSError:
        return "its embeddings or neighbours are gone"
    changed = [key for key, value in stamps.items() if meta.get(key) != value]
    if changed:
        return f"its {' and '.join(changed)} changed since it was mined"
    return None


def changed_since_found(parent: Parent, encoder: str) -> str | None:
    """After reading the parent: whether its files still are the ones its record describes."""
    meta = parent.meta
    return _rejection(parent.layout, meta, encoder, meta["k"], meta["dim"], meta["code_version"], None)


def find_parent(layout: RunLayout, encoder: str, k: int, dim: int, code_version: str) -> Parent:
    """The newest usable published version under the same output root (see module doc); raises
    NoIncremental naming why none qualifies."""
    candidates = []
    for sibling in sorted(layout.root.parent.iterdir()) if layout.root.parent.is_dir() else []:
        if sibling == layout.root or sibling.name.startswith(".") or not (sibling / "manifest.json").is_file():
            continue
        other = RunLayout(sibling)
        try:
            manifest = read_json(sibling / "manifest.json")
            meta = read_json(meta_path(other, encoder)) if meta_path(other, encoder).is_file() else None
        except (OSError, ValueError):
            continue
        if manifest.get("version") == sibling.name and manifest.get("published_at"):
            candidates.append((str(manifest["published_at"]), other, meta))
    if not candidates:
        raise NoIncremental(f"no published version under {layout.root.parent} to reuse")
    candidates.sort(key=lambda c: c[0], reverse=True)
    identity = embed_identity(layout, encoder)
    rejected = []
    for _, other, meta in candidates:
        why = "no record of its mining (mined before incremental mining existed?)" if meta is None else \
            _rejection(other, meta, encoder, k, dim, code_version, identity)
        if why is None:
            return Parent(other, meta)
        rejected.append(f"{other.root.name}: {why}")
    raise NoIncremental(f"no published version can serve as parent for '{encoder}' ({'; '.join(rejected[:3])}"
                        + (f"; +{len(rejected) - 3} more)" if len(rejected) > 3 else ")"))


def _batches(con, name: str, params: dict, rows: int):
    reader = con.sql(sql(name), params=params).to_arrow_reader(rows)
    for batch in reader:
        yield {col: batch.column(col).to_numpy(zero_copy_only=False) for col in batch.schema.names}


def prepare(out: Path, layout: RunLayout, encoder: str, vectors: VectorFile, parent: Parent,
            mining: MiningConfig, db_settings: dict[str, Any]) -> dict[str, Any]:
    """Write the incremental plan's arrays into `out` (a fresh folder) and return its counts;
    raises NoIncremental when the parent turns out unusable (no identical shared vector, or its
    lists are incomplete). Linear in the corpus: one pass over both vector files and over the
    parent's neighbours, joins out of core in DuckDB."""
    k, n = mining.k, vectors.n
    pvec = VectorFile(parent.layout.embedding_vectors(encoder))
    m = pvec.n
    chunk = max(1024, (64 * 2**20) // vectors.row_bytes)

    spill = out / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    con = open_session({**db_settings, "temp_directory": str(spill), "preserve_insertion_order": False})
    try:
        # 1. Shared image ids, and which of them kept a bit-identical vector.
        par_to_cur = np.full(m, -1, dtype=np.int64)  # parent row -> this run's row, identical vectors only
        reusable = np.zeros(n, dtype=bool)
        shared = 0
        for batch in _batches(con, "mine_shared_rows",
                              {"current_ids": str(layout.embedding_ids(encoder)),
                               "parent_ids": str(parent.layout.embedding_ids(encoder))}, chunk):
            cur, par = batch["cur_row"].astype(np.int64), batch["par_row"].astype(np.int64)
            same = (vectors.take(cur).view(np.uint32) == pvec.take(par).view(np.uint32)).all(axis=1)
            par_to_cur[par[same]] = cur[same]
            reusable[cur[same]] = True
            shared += len(cur)
        reused_rows = np.flatnonzero(reusable)
        if not len(reused_rows):
            raise NoIncremental(f"no image shares an identical '{encoder}' vector with {parent.version}")

        # 2. The parent's lists of those queries, in this run's row numbers.
        parent_t = np.lib.format.open_memmap(out / "parent_t.npy", mode="w+", dtype=np.int64, shape=(len(reused_rows), k))
        parent_sim = np.lib.format.open_memmap(out / "parent_sim.npy", mode="w+", dtype=np.float32,
                                               shape=(len(reused_rows), k))
        parent_t[:] = -1
        parent_sim[:] = -np.inf
        for batch in _batches(con, "mine_parent_neighbours",
                              {"neighbours": str(parent.layout.neighbours(encoder)),
                               "ids": str(parent.layout.embedding_ids(encoder)), "k": k}, 1 << 20):
            q = par_to_cur[batch["q_row"].astype(np.int64)]
            keep = q >= 0
            pos = np.searchsorted(reused_rows, q[keep])
            t = par_to_cur[batch["t_row"].astype(np.int64)[keep]]
            col = batch["rank"].astype(np.int64)[keep] - 1
            parent_t[pos, col] = np.where(t >= 0, t, GONE)
            parent_sim[pos, col] = batch["sim"][keep]
        remined = np.zeros(len(reused_rows), dtype=bool)
        for a in range(0, len(reused_rows), chunk):
            lists = np.asarray(parent_t[a:a + chunk])
            # An exact parent holds min(k, m - 1) neighbours for every query; anything else is not
            # a list to trust.
            if ((lists != -1).sum(axis=1) != min(k, m - 1)).any():
                raise NoIncremental(f"{parent.version}'s neighbours of '{encoder}' do not hold "
                                    f"{min(k, m - 1)} per query")
            remined[a:a + chunk] = (lists == GONE).any(axis=1)
        parent_t.flush()
        parent_sim.flush()
        del parent_t, parent_sim
    finally:
        con.close()
        shutil.rmtree(out / "duckdb", ignore_errors=True)

    # 3. Query kinds, and the new (or changed) vectors old queries are searched against.
    kind = np.zeros(n, dtype=np.uint8)
    kind[reused_rows[~remined]] = 1
    new_rows = np.flatnonzero(~reusable)
    np.save(out / "kind.npy", kind)
    np.save(out / "reused_rows.npy", reused_rows)
    np.save(out / "new_rows.npy", new_rows)
    new_vectors = np.lib.format.open_memmap(out / "new_vectors.npy", mode="w+", dtype=np.float32,
                                            shape=(len(new_rows), vectors.dim))
    for a in range(0, len(new_rows), chunk):
        new_vectors[a:a + chunk] = vectors.take(new_rows[a:a + chunk])
    new_vectors.flush()
    del new_vectors

    from_parent = int(kind.sum())
    return {
        "parent": parent.layout.root.name,
        "parent_run_dir": str(parent.layout.root),
        "queries_from_parent": from_parent,
        "new_queries": n - shared,
        "changed_vectors": shared - len(reused_rows),
        "remined_queries": int(remined.sum()),
        "queries_searched_in_full": n - from_parent,
        "old_queries_searched_against_new": from_parent if len(new_rows) else 0,
        "new_rows": len(new_rows),
        "removed_images": m - shared,
    }


class IncrementalPlan:
    """The prepared folder, read by the work items (arrays memory-mapped)."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    @cached_property
    def kind(self) -> np.ndarray:
        return np.load(self.dir / "kind.npy", mmap_mode="r")

    @cached_property
    def reused_rows(self) -> np.ndarray:
        return np.load(self.dir / "reused_rows.npy")

    @cached_property
    def new_rows(self) -> np.ndarray:
        return np.load(self.dir / "new_rows.npy")

    @cached_property
    def new_vectors(self) -> VectorFile:
        return VectorFile(self.dir / "new_vectors.npy")

    def parent_lists(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sims, this run's rows) of the parent lists of old queries `rows` (ascending)."""
        pos = np.searchsorted(self.reused_rows, rows)
        if len(pos) and not np.array_equal(self.reused_rows[np.minimum(pos, len(self.reused_rows) - 1)], rows):
            raise RuntimeError(f"{self.dir}: rows without a parent list were asked for; re-plan mining")
        sims = np.load(self.dir / "parent_sim.npy", mmap_mode="r")
        targets = np.load(self.dir / "parent_t.npy", mmap_mode="r")
        if len(pos) and (pos[-1] - pos[0] == len(pos) - 1):  # a contiguous run: one slice each
            return np.array(sims[pos[0]:pos[-1] + 1]), np.array(targets[pos[0]:pos[-1] + 1])
        return np.array(sims[pos]), np.array(targets[pos])
