"""Exact inner-product search, sharded to fit `mining.memory_budget`: every query's top-k is
merged across database shards, so the result equals one unsharded exact search (up to ties). The
CPU engine scores tiles with BLAS; the GPU one uses a FAISS flat index per shard."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .index import FLOAT32, GPU_MAX_K, Device, IndexPlan, MiningResourceError, VectorFile, tile_bytes


def merge_topk(d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray, k: int):
    """Best k of two result lists per row; on equal sims the first list (lower shards) wins."""
    d, i = np.concatenate([d1, d2], axis=1), np.concatenate([i1, i2], axis=1)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def merge_topk_by_row(d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray, k: int):
    """Best k of two result lists of database rows per query; equal sims in descending row, the
    order in which FAISS's heaps hand equal values back, so that merging the results of two parts
    of a database (one exact search each) usually lists ties as one search over all of it would."""
    d, i = np.concatenate([d1, d2], axis=1), np.concatenate([i1, i2], axis=1)
    order = np.lexsort((-i, -d), axis=1)[:, :k]  # none (-1) has sim -inf: last
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def topk_rows(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each row of `sims` (any width), sorted; ids has the shape of sims. Pads with -1."""
    rows, width = sims.shape
    if width > k:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        sims, ids = np.take_along_axis(sims, part, 1), np.take_along_axis(ids, part, 1)
    order = np.argsort(-sims, axis=1, kind="stable")
    sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return sims, ids


class FlatSearcher:
    """Exact inner-product top-kk over the whole file, one budget-sized shard resident at a time."""

    def __init__(self, vectors: VectorFile, plan: IndexPlan, device: Device, batch: int):
        self.vectors, self.plan, self.device, self.batch = vectors, plan, device, batch
        self._resident: tuple[int, Any] | None = None  # (shard number, searchable shard)

    def shards(self) -> list[tuple[int, int]]:
        rows = self.plan.shard_rows
        return [(a, min(a + rows, self.vectors.n)) for a in range(0, self.vectors.n, rows)]

    def _load(self, number: int, start: int, stop: int):
        if self._resident and self._resident[0] == number:
            return self._resident[1]
        self._resident = None  # drop the previous shard before reading the next
        data = self.vectors.read(start, stop)
        shard = GpuFlat(data, self.device) if self.device.kind == "cuda" else CpuFlat(data, self.plan.budget_bytes)
        self._resident = (number, shard)
        return shard

    def search(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (first query row, sims, database rows) per query batch of rows [start, stop)."""
        for offset, sims, idx in self.search_rows(np.arange(start, stop)):
            yield start + offset, sims, idx

    def search_rows(self, rows: np.ndarray, queries: VectorFile | None = None
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (offset into `rows`, sims, database rows) per query batch. The queries are rows
        `rows` of `queries` (default: this database's own file), in any order; contiguous runs
        are read with pread."""
        source = self.vectors if queries is None else queries
        kk, shards, n = self.plan.kk, self.shards(), len(rows)
        if len(shards) == 1:
            shard = self._load(0, *shards[0])
            for a in range(0, n, self.batch):
                b = min(a + self.batch, n)
                yield a, *shard.search(read_rows(source, rows[a:b]), kk)
            return
        # Several shards: a block of queries keeps its running top-k while every shard passes by,
        # so each shard is read once per block rather than once per batch.
        for block_start in range(0, n, self.plan.block_rows):
            block_stop = min(block_start + self.plan.block_rows, n)
            best_d = np.full((block_stop - block_start, kk), -np.inf, dtype=np.float32)
            best_i = np.full((block_stop - block_start, kk), -1, dtype=np.int64)
            for number, (s0, s1) in enumerate(shards):
                shard = self._load(number, s0, s1)
                for a in range(block_start, block_stop, self.batch):
                    b = min(a + self.batch, block_stop)
                    d, i = shard.search(read_rows(source, rows[a:b]), min(kk, s1 - s0))
                    i = np.where(i >= 0, i + s0, -1)
                    r = slice(a - block_start, b - block_start)
                    best_d[r], best_i[r] = merge_topk(best_d[r], best_i[r], d, i, kk)
            for a in range(0, len(best_d), self.batch):
                b = min(a + self.batch, len(best_d))
                yield block_start + a, best_d[a:b], best_i[a:b]


def read_rows(vectors: VectorFile, rows: np.ndarray) -> np.ndarray:
    """Rows of a vector file: one pread when they are a contiguous ascending run, else gathered."""
    if not len(rows):
        return np.empty((0, vectors.dim), dtype=np.float32)
    if (np.diff(rows) == 1).all():
        return vectors.read(int(rows[0]), int(rows[-1]) + 1)
    return vectors.take(np.asarray(rows, dtype=np.int64))


class CpuFlat:
    """Exact top-k: numpy's sgemm scores a tile of the shard against the query batch, FAISS's heaps
    keep each query's best k. numpy's BLAS is the faster one here (faiss-cpu bundles an older
    OpenBLAS), and the tile buffer is small and reused, so the search runs at sgemm speed."""

    def __init__(self, data: np.ndarray, budget: int):
        self.data, self.tile_bytes = data, tile_bytes(budget)
        self._buffer = np.empty(0, dtype=np.float32)  # reused: fresh pages cost a fault each

    def search(self, queries: np.ndarray, k: int):
        import faiss

        nq, n = len(queries), len(self.data)
        sims = np.empty((nq, k), dtype=np.float32)
        rows = np.empty((nq, k), dtype=np.int64)
        heaps = faiss.float_minheap_array_t()  # a min-heap keeps the k largest
        heaps.k, heaps.nh, heaps.val, heaps.ids = k, nq, faiss.swig_ptr(sims), faiss.swig_ptr(rows)
        heaps.heapify()
        tile = max(256, min(n, self.tile_bytes // (FLOAT32 * max(nq, 1))))
        if len(self._buffer) < nq * tile:
            self._buffer = np.empty(nq * tile, dtype=np.float32)
        buffer = self._buffer
        for a in range(0, n, tile):
            b = min(a + tile, n)
            scores = buffer[: nq * (b - a)].reshape(nq, b - a)
            np.matmul(queries, self.data[a:b].T, out=scores)
            heaps.addn(b - a, faiss.swig_ptr(scores), a, 0, nq)  # ids a..b-1, all queries
        heaps.reorder()
        return sims, rows


class GpuFlat:
    """The shard split across GPUs (IndexShards of GpuIndexFlatIP), float16 storage optional."""

    def __init__(self, data: np.ndarray, device: Device):
        import faiss

        dim = data.shape[1]
        self.resources = [faiss.StandardGpuResources() for _ in device.gpus]
        self.parts = []
        bounds = np.linspace(0, len(data), len(device.gpus) + 1).astype(int)
        for res, gpu, a, b in zip(self.resources, device.gpus, bounds[:-1], bounds[1:]):
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device, cfg.useFloat16 = int(gpu), device.float16
            part = faiss.GpuIndexFlatIP(res, dim, cfg)
            part.add(data[a:b])
            self.parts.append(part)
        if len(self.parts) == 1:
            self.index = self.parts[0]
        else:
            self.index = faiss.IndexShards(dim, True, True)  # threaded, ids continue across parts
            for part in self.parts:
                self.index.add_shard(part)

    def search(self, queries: np.ndarray, k: int):
        if k > GPU_MAX_K:
            raise MiningResourceError(f"FAISS on GPU returns at most {GPU_MAX_K - 1} neighbours; lower mining.k")
        return self.index.search(queries, k)
