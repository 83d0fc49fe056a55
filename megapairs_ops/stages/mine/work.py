"""Mining: k nearest neighbours per query image for one encoder, kept when inside the encoder's band.

Inner product on L2-normalised vectors is cosine similarity. The search engine (exact and sharded,
IVF-Flat, or IVF-PQ with exact re-ranking; CPU or GPU) is chosen by index.choose_index from
the corpus size, the dimension and mining.memory_budget; docs/mining.md describes the rule.

Semantics, whatever the engine: a query's own row is never its neighbour; its first k neighbours
are its retrieved set (neighbours/{enc}.parquet, kept for hard negatives); of those, the ones with
lo < sim < hi are candidates, at most max_targets_per_query per query, most similar first.

The work is split into query ranges, one work item each:
    items = plan_mining_work(cfg, layout, encoder)    # small JSON-able dicts
    search_queries(cfg, layout, item)                 # one part per item, atomic; its stats commit it
    finalize_mining(cfg, layout, encoder)             # parts -> candidates/{enc}.parquet, neighbours/...
`mine_candidates` runs the three in one process. Parts live in the encoder's work dir
(work/mine-<enc>/, storage.WorkDir), planned for a fingerprint of the result config and the
embeddings, so a changed input never reuses stale parts.

Incremental mining (mining.incremental, incremental.py): plan_mining_work looks for an earlier run
under the same output root whose exact neighbours of this encoder can be reused, and records its
decision in the work dir's plan (mode full or incremental, and why). The work items stay query
ranges: inside each, new images are searched against the whole corpus and old queries merge their
parent list with a search over the new images only; output rows come in query row order either
way, so the files equal a full recompute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import MiningConfig, PipelineConfig, parse_bytes
from megapairs_ops.db import session_settings
from megapairs_ops.errors import ItemsNotDone
from megapairs_ops.stages.mine.incremental import IncrementalPlan, NoIncremental, changed_since_found, find_parent, prepare, write_meta
from megapairs_ops.stages.mine.flat import FlatSearcher, merge_topk_by_row
from megapairs_ops.stages.mine.index import IndexPlan, MiningResourceError, VectorFile, choose_index, resolve_device
from megapairs_ops.stages.mine.ivf import IvfSearcher, ensure_ivf
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import CANDIDATE_SCHEMA
from megapairs_ops.storage import WorkDir, atomic_dir, atomic_path, read_json

log = logging.getLogger("megapairs")

# Bumped when mining output semantics change, so parts of an older version are never merged.
MINE_CODE_VERSION = "2"
HIST_BINS = 20  # sims of all neighbours, bins over [0, 1]
# Counts of an incremental plan that the stage's stats carry (stats.json, the curator report).
INCREMENTAL_KEYS = ("parent", "parent_run_dir", "queries_from_parent", "new_queries", "changed_vectors",
                    "remined_queries", "queries_searched_in_full", "old_queries_searched_against_new",
                    "new_rows", "removed_images")


def split_budget(mining: MiningConfig, **update: Any) -> MiningConfig:
    """Incremental mining holds two exact indexes at once (the whole corpus for new queries, the
    new images for old ones): each gets half of mining.memory_budget."""
    return mining.model_copy(update={"memory_budget": parse_bytes(mining.memory_budget) // 2, **update})


@dataclass
class _Work:
    """One encoder's mining work: inputs, plan and where its parts go."""

    cfg: PipelineConfig
    layout: RunLayout
    encoder: str

    @cached_property
    def vectors(self) -> VectorFile:
        vectors = VectorFile(self.layout.embedding_vectors(self.encoder))
        n_ids = pq.ParquetFile(self.layout.embedding_ids(self.encoder)).metadata.num_rows
        if n_ids != vectors.n:
            raise ValueError(
                f"embeddings of '{self.encoder}' are inconsistent: {vectors.n} vectors but {n_ids} ids; "
                "delete the encoder's embeddings folder and re-run the embed stage"
            )
        return vectors

    @cached_property
    def full_plan(self) -> IndexPlan:
        return choose_index(self.cfg.mining, self.vectors.n, self.vectors.dim)

    @cached_property
    def work(self) -> WorkDir:
        return WorkDir(self.layout.work_dir(f"mine-{self.encoder}"))

    @property
    def dir(self) -> Path:
        return self.work.root

    @cached_property
    def mode(self) -> dict:
        """The decision of plan_mining_work: {"mode": "full"|"incremental", "reason", ...}."""
        plan = self.work.matches(self.fingerprint)
        if plan is None:
            raise ItemsNotDone(f"mining '{self.encoder}' is not planned in {self.dir}; run plan_mining_work first")
        return plan["mode"]

    @cached_property
    def incremental(self) -> IncrementalPlan | None:
        return IncrementalPlan(self.dir / self.mode["folder"]) if self.mode["mode"] == "incremental" else None

    @cached_property
    def plan(self) -> IndexPlan:
        if self.incremental is None:
            return self.full_plan
        return choose_index(split_budget(self.cfg.mining), self.vectors.n, self.vectors.dim)

    @cached_property
    def new_plan(self) -> IndexPlan:
        """Incremental: the exact index over the new images that old queries search."""
        return choose_index(split_budget(self.cfg.mining, index="flat"), len(self.incremental.new_rows),
                            self.vectors.dim)

    @property
    def exact(self) -> bool:
        return self.full_plan.kind == "flat" and not self.cfg.mining.gpu_float16

    @cached_property
    def fingerprint(self) -> str:
        def stat(path: Path) -> list[int]:
            st = path.stat()
            return [st.st_size, st.st_mtime_ns]

        # The result config (runtime knobs such as query batches, tasks, devices and whether an
        # earlier run's neighbours are reused stay out: the plan records the reuse decision)
        # and the embeddings it searches.
        return self.cfg.section_fingerprint(
            "mine-work", MINE_CODE_VERSION, self.cfg.mining, list(self.cfg.encoder(self.encoder).band), self.cfg.seed,
            stat(self.layout.embedding_vectors(self.encoder)), stat(self.layout.embedding_ids(self.encoder)),
        )

    def part(self, item_id: str, kind: str) -> Path:
        return self.work.part(item_id, kind)

    def items(self) -> list[dict]:
        n, per = self.vectors.n, self.cfg.mining.queries_per_task
        count = max(1, -(-n // per))
        bounds = np.linspace(0, n, count + 1).astype(int)
        return [{"id": f"q{a:012d}-{b:012d}", "encoder": self.encoder, "query_start": int(a), "query_stop": int(b)}
                for a, b in zip(bounds[:-1], bounds[1:])]

    @cached_property
    def ids(self) -> pa.Array:
        table = pq.read_table(self.layout.embedding_ids(self.encoder), columns=["image_id"])
        return table.column(0).combine_chunks().cast(pa.string())

    def searcher(self):
        mining, plan, device = self.cfg.mining, self.plan, resolve_device(self.cfg.mining)
        if plan.kind == "flat":
            return FlatSearcher(self.vectors, plan, device, mining.query_batch_size), device, None
        index, meta = ensure_ivf(self.dir, self.vectors, plan, mining, device, self.cfg.seed)
        searcher = IvfSearcher(self.vectors, plan, device, mining.query_batch_size, index)
        searcher.set_nprobe(meta["nprobe"])
        return searcher, device, meta


def plan_mining_work(cfg: PipelineConfig, layout: RunLayout, encoder: str) -> list[dict]:
    """Query ranges of one encoder, one work item each. Decides (and logs) full or incremental
    mining and the index once per execution (recorded in the work dir's plan); for the
    approximate indexes it also trains, fills and calibrates the shared IVF index, and an
    incremental plan prepares its parent lists (a linear pass), so this step needs the same
    worker as mining (minutes at scale). Cheap when the plan stands."""
    work = _Work(cfg, layout, encoder)
    items = work.items()
    if work.work.matches(work.fingerprint) is None:
        work.work.start(work.fingerprint, [i["id"] for i in items], lambda root: {"mode": _decide(work)})
    mode = work.mode
    plan = work.plan
    log.info("mining %s: %s, %s; %d shard(s) of <= %d rows; %d work item(s); %s mining: %s", encoder,
             plan.faiss_name, plan.reason, plan.n_shards, plan.shard_rows, len(items), mode["mode"], mode["reason"])
    if plan.kind != "flat" and work.vectors.n >= 2:
        work.searcher()
    return items


def _decide(work: _Work) -> dict:
    """Full or incremental mining, and why; an incremental plan's arrays go into the (fresh)
    work dir."""
    mining, n, dim = work.cfg.mining, work.vectors.n, work.vectors.dim
    try:
        if not mining.incremental:
            raise NoIncremental("mining.incremental is off")
        if n < 2:
            raise NoIncremental("fewer than two images")
        if work.full_plan.kind != "flat":
            raise NoIncremental(f"the {work.full_plan.faiss_name} index is approximate; only the exact index "
                                "(flat) reuses neighbours")
        if mining.gpu_float16:
            raise NoIncremental("mining.gpu_float16 stores vectors in float16, which is not exact")
        try:
            choose_index(split_budget(mining), n, dim)
        except MiningResourceError as exc:
            raise NoIncremental(f"half of mining.memory_budget is too small for two indexes ({exc})") from None
        parent = find_parent(work.layout, work.encoder, mining.k, dim, MINE_CODE_VERSION)
        described = parent.describe()
        plan_id = hashlib.sha256(json.dumps([work.fingerprint, described], sort_keys=True).encode()).hexdigest()[:12]
        folder = f"inc-{plan_id}"
        with atomic_dir(work.dir / folder) as tmp:
            settings = session_settings(work.cfg, work.layout, f"mine-{work.encoder}")
            counts = prepare(tmp, work.layout, work.encoder, work.vectors, parent, mining, settings)
            # The parent was read over a while: it must still be what its record says.
            changed = changed_since_found(parent, work.encoder)
            if changed:
                raise NoIncremental(f"{parent.version} changed while it was read: {changed}")
    except NoIncremental as exc:
        log.info("mining %s: full mining: %s", work.encoder, exc)
        return {"mode": "full", "reason": str(exc)}
    reason = f"reusing the exact neighbours of {parent.version}"
    log.info("mining %s: incremental, %s: %s", work.encoder, reason, counts)
    return {"mode": "incremental", "reason": reason, "plan_id": plan_id, "folder": folder, **counts}


def run_mining_work(cfg: PipelineConfig, layout: RunLayout, item: dict) -> dict:
    """One work item as a mapped task runs it: searched and committed, or skipped when done."""
    work = _Work(cfg, layout, item["encoder"])
    if work.work.is_done(item["id"]):
        return {**item, **(work.work.stats(item["id"]) or {}), "skipped": True}
    stats = search_queries(cfg, layout, item)
    work.work.commit(item["id"], stats)
    return {**item, **stats}


def search_queries(cfg: PipelineConfig, layout: RunLayout, item: dict) -> dict:
    """Search one query range and write its candidates and neighbours parts (atomic); returns
    the item's stats, which commit it."""
    work = _Work(cfg, layout, item["encoder"])
    enc = cfg.encoder(work.encoder)
    lo, hi = enc.band
    k, cap = cfg.mining.k, cfg.mining.max_targets_per_query
    start, stop = item["query_start"], item["query_stop"]
    t0 = time.perf_counter()
    stats = {"queries": stop - start, "neighbours": 0, "candidates": 0, "queries_with_candidates": 0,
             "sim_histogram": [0] * HIST_BINS, "device": "cpu"}
    with (
        atomic_path(work.part(item["id"], "candidates")) as cand_tmp,
        atomic_path(work.part(item["id"], "neighbours")) as neigh_tmp,
    ):
        with (
            pq.ParquetWriter(cand_tmp, CANDIDATE_SCHEMA, compression="zstd") as cand_writer,
            pq.ParquetWriter(neigh_tmp, CANDIDATE_SCHEMA, compression="zstd") as neigh_writer,
        ):
            if work.incremental is not None:
                batches = _incremental_batches(work, start, stop, stats)
            elif work.vectors.n >= 2 and stop > start:
                searcher, device, _ = work.searcher()
                stats["device"] = device.kind
                batches = ((np.arange(first, first + len(sims)), sims, idx)
                           for first, sims, idx in searcher.search(start, stop))
            else:
                batches = iter(())
            for rows, sims, idx in batches:
                neigh, cand, with_cand = _select(work.ids, rows, sims, idx, k, lo, hi, cap)
                neigh_writer.write_table(neigh)
                cand_writer.write_table(cand)
                stats["neighbours"] += neigh.num_rows
                stats["candidates"] += cand.num_rows
                stats["queries_with_candidates"] += with_cand
                hist = np.histogram(np.clip(neigh.column("sim").to_numpy(), 0, 1), bins=HIST_BINS, range=(0, 1))
                stats["sim_histogram"] = (np.asarray(stats["sim_histogram"]) + hist[0]).tolist()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def _select(ids: pa.Array, rows: np.ndarray, sims: np.ndarray, idx: np.ndarray, k: int, lo: float, hi: float,
            cap: int) -> tuple[pa.Table, pa.Table, int]:
    """Neighbours and in-band candidates of one batch of queries (query rows `rows`, ascending)."""
    rows = np.asarray(rows, dtype=np.int64)[:, None]
    # A query can tie with an identical vector ahead of itself, so self is dropped by row, not position.
    keep = (idx != rows) & (idx >= 0)
    rank = np.cumsum(keep, axis=1)  # 1-based among the query's own neighbours
    keep &= rank <= k
    in_band = keep & (sims > lo) & (sims < hi)
    # Neighbours are ordered by similarity, so the first `cap` in band are the most similar.
    in_band &= np.cumsum(in_band, axis=1) <= cap
    q = np.broadcast_to(rows, idx.shape)
    return (_table(ids, q[keep], idx[keep], sims[keep], rank[keep]),
            _table(ids, q[in_band], idx[in_band], sims[in_band], rank[in_band]),
            int(in_band.any(axis=1).sum()))


class _RowStream:
    """Blocks of (ascending query rows, sims, database rows), handed out up to a given row."""

    def __init__(self, blocks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.blocks, self.pos = blocks, 0
        self.rows = np.empty(0, dtype=np.int64)
        self.sims = self.idx = None

    def until(self, stop: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        pieces = []
        while True:
            if self.pos >= len(self.rows):
                block = next(self.blocks, None)
                if block is None:
                    return pieces
                (self.rows, self.sims, self.idx), self.pos = block, 0
                continue
            end = self.pos + int(np.searchsorted(self.rows[self.pos:], stop))
            pieces.append((self.rows[self.pos:end], self.sims[self.pos:end], self.idx[self.pos:end]))
            self.pos = end
            if end < len(self.rows):
                return pieces


def _searched_blocks(searcher: FlatSearcher, rows: np.ndarray, block: int, queries: VectorFile | None = None):
    """Search `rows` in blocks (each shard read once per block); yields (rows, sims, database rows)."""
    for a in range(0, len(rows), block):
        part = rows[a:a + block]
        sims = np.empty((len(part), searcher.plan.kk), dtype=np.float32)
        idx = np.empty((len(part), searcher.plan.kk), dtype=np.int64)
        for offset, d, i in searcher.search_rows(part, queries):
            sims[offset:offset + len(d)], idx[offset:offset + len(d)] = d, i
        yield part, sims, idx


def _old_query_blocks(work: _Work, rows: np.ndarray, device) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Old queries: the parent's top k merged with their top k among the new images."""
    inc, k, batch = work.incremental, work.cfg.mining.k, work.cfg.mining.query_batch_size
    new_rows = inc.new_rows
    if not len(new_rows):
        for a in range(0, len(rows), max(batch, work.plan.block_rows // 2)):
            part = rows[a:a + max(batch, work.plan.block_rows // 2)]
            yield part, *inc.parent_lists(part)
        return
    newer = FlatSearcher(inc.new_vectors, work.new_plan, device, batch)
    for part, sims, idx in _searched_blocks(newer, rows, max(batch, work.new_plan.block_rows // 2), work.vectors):
        parent_sims, parent_rows = inc.parent_lists(part)
        idx = np.where(idx >= 0, new_rows[np.maximum(idx, 0)], -1)
        # Deterministic, and ties mostly as the exact search lists them (merge_topk_by_row).
        yield part, *merge_topk_by_row(parent_sims, parent_rows, sims, idx, k)


def _incremental_batches(work: _Work, start: int, stop: int, stats: dict):
    """Query rows [start, stop) in batches of query_batch_size, ascending: new (and re-mined)
    queries searched against the whole corpus, old ones from _old_query_blocks."""
    inc, k, batch = work.incremental, work.cfg.mining.k, work.cfg.mining.query_batch_size
    kind = np.asarray(inc.kind[start:stop])
    full_rows, old_rows = np.flatnonzero(kind == 0) + start, np.flatnonzero(kind == 1) + start
    device = resolve_device(work.cfg.mining)
    streams = []
    if len(full_rows):
        searcher, device, _ = work.searcher()
        streams.append(_RowStream(_searched_blocks(searcher, full_rows, max(batch, work.plan.block_rows // 2))))
    if len(old_rows):
        streams.append(_RowStream(_old_query_blocks(work, old_rows, device)))
    if streams:
        stats["device"] = device.kind
    width = max(work.plan.kk, k)
    for a in range(start, stop, batch):
        pieces = [piece for stream in streams for piece in stream.until(min(a + batch, stop))]
        rows = np.concatenate([p[0] for p in pieces])
        sims = np.full((len(rows), width), -np.inf, dtype=np.float32)
        idx = np.full((len(rows), width), -1, dtype=np.int64)
        at = 0
        for _, d, i in pieces:
            sims[at:at + len(d), :d.shape[1]], idx[at:at + len(d), :d.shape[1]] = d, i
            at += len(d)
        order = np.argsort(rows, kind="stable")
        yield rows[order], sims[order], idx[order]


def finalize_mining(cfg: PipelineConfig, layout: RunLayout, encoder: str) -> dict:
    """Merge the committed parts into candidates/{enc}.parquet and neighbours/{enc}.parquet;
    returns the stage's stats. ItemsNotDone while a work item is missing."""
    work = _Work(cfg, layout, encoder)
    parts = work.work.require_all()
    for kind, final in (("neighbours", layout.neighbours(encoder)), ("candidates", layout.candidates(encoder))):
        paths = [work.part(p["item"], kind) for p in parts]
        final.parent.mkdir(parents=True, exist_ok=True)
        if len(paths) == 1:
            _link(paths[0], final)  # no copy; the part stays until the stage is finished
            continue
        with atomic_path(final) as tmp, pq.ParquetWriter(tmp, CANDIDATE_SCHEMA, compression="zstd") as w:
            for path in paths:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16):
                    w.write_batch(batch)
    write_meta(layout, encoder, k=cfg.mining.k, exact=work.exact, code_version=MINE_CODE_VERSION,
               dim=work.vectors.dim)
    lo, hi = cfg.encoder(encoder).band
    ivf_meta = work.dir / "ivf.json"
    mode = work.mode
    stats = {
        "mode": mode["mode"],
        "mode_reason": mode["reason"],
        "queries": sum(p["queries"] for p in parts),
        "neighbours": sum(p["neighbours"] for p in parts),
        "candidates": sum(p["candidates"] for p in parts),
        "queries_with_candidates": sum(p["queries_with_candidates"] for p in parts),
        "band": [lo, hi],
        "k": cfg.mining.k,
        "index": work.plan.faiss_name,
        "index_plan": {**work.plan.describe(), **(read_json(ivf_meta) if ivf_meta.is_file() else {})},
        "devices": sorted({p["device"] for p in parts}),
        "work_items": len(parts),
        "search_seconds": round(sum(p["seconds"] for p in parts), 3),
        "sim_histogram_0_1_by_0_05": np.sum([p["sim_histogram"] for p in parts], axis=0).astype(int).tolist(),
    }
    if work.incremental is not None:
        stats["incremental"] = {key: mode[key] for key in INCREMENTAL_KEYS}
    return stats


def _link(source: Path, final: Path) -> None:
    """`final` becomes the same file as `source` (a hard link, else a copy), atomically."""
    with atomic_path(final) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def mine_candidates(cfg: PipelineConfig, encoder_name: str, layout: RunLayout) -> dict:
    """The whole mining stage of one encoder in this process: plan, every work item, finalize;
    the work dir is removed once the outputs are written, as after a finished stage."""
    from megapairs_ops.pipeline.runner import run_work_inline
    from megapairs_ops.stages.mine import MineStage

    return run_work_inline(MineStage(), cfg, layout, [encoder_name])[0]


def _table(ids: pa.Array, q: np.ndarray, t: np.ndarray, sim: np.ndarray, rank: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "q_id": ids.take(pa.array(q, pa.int64())),
            "t_id": ids.take(pa.array(t, pa.int64())),
            "sim": pa.array(sim.astype(np.float32)),
            "rank": pa.array(rank.astype(np.int32)),
        },
        schema=CANDIDATE_SCHEMA,
    )


def read_candidates(path: Path) -> pa.Table:
    return pq.read_table(path, schema=CANDIDATE_SCHEMA)
