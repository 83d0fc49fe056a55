"""k-NN search engines for mining: the index choice, sharded exact search, IVF, and the GPU path.

How the index is chosen (`choose_index`; docs/mining.md says the same for users):

* `mining.index: flat` (and `auto` while N <= `exact_max_vectors`): exact inner-product search.
  The database is cut into shards that fit `memory_budget`; every query's top-k is merged across
  shards, so the result equals one unsharded exact search (up to ties).
* `auto` above `exact_max_vectors`: IVF-Flat when the full vectors plus lists fit the budget,
  else IVF-PQ whose shortlist is re-ranked exactly from vectors.npy. `nlist` defaults to the
  power of two nearest sqrt(N) (>= 39 training points per list); the coarse quantizer is trained
  on a seeded sample of `train_size` (default 64 x nlist) vectors. `nprobe` is calibrated: the
  smallest value whose recall@k on `calibration_queries` sample queries, against exact ground
  truth, reaches `recall_target` with 95% confidence (without calibration: nlist / 16).
* `device: auto` uses CUDA when faiss has GPU support and sees a GPU; `cuda` insists on it.

Everything here works on row numbers of vectors.npy; mine.py turns rows into image ids.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megapairs_ops.config import MiningConfig, parse_bytes
from megapairs_ops.storage import atomic_path

log = logging.getLogger("megapairs")

FLOAT32 = 4
# Per-process scratch outside our own arrays (FAISS buffers, Arrow batches, allocator slack), on top
# of the exact search's score tile.
SCRATCH_BYTES = 96 * 2**20  # bench/mine.py measures mining's peak against its budget
# Arrow id column (16-char string + offset) and a Python object per id are never both held.
ID_BYTES = 24
# FAISS GPU kernels select at most this many neighbours per query.
GPU_MAX_K = 2048
# IVF-Flat on CPU scores a list against all its queries at once when it has at least this many on
# average (4x faster than FAISS's per-query scan at 16k-query batches on 1M vectors).
GROUPED_MIN_QUERIES_PER_LIST = 8
# Sub-quantizer counts FAISS GPU IVF-PQ supports; CPU takes any divisor but one rule serves both.
PQ_M_CHOICES = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 2, 1)


class MiningResourceError(ValueError):
    """The configured index, device or memory budget cannot serve this corpus."""


def tile_bytes(budget: int) -> int:
    """The exact search's score tile (queries x database rows): wide tiles keep sgemm near its peak
    (16k columns for a 4k-query batch), small budgets get narrower ones."""
    return int(min(256 * 2**20, max(16 * 2**20, budget // 16)))


# ---------------------------------------------------------------------------------------------
# vectors.npy without mapping it into the process: rows are read with pread into our own buffers,
# so resident memory is exactly what the search holds.


class VectorFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise ValueError(
                f"{self.path}: expected a C-ordered 2-D float32 array, got shape {shape} {dtype}; "
                "re-run the embed stage"
            )
        self.n, self.dim = int(shape[0]), int(shape[1])
        self.row_bytes = self.dim * FLOAT32

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(stop - start, 0), self.dim), dtype=np.float32)
        view, pos = memoryview(out).cast("B"), self.offset + start * self.row_bytes
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                got = os.preadv(f.fileno(), [view[done:]], pos + done)
                if got <= 0:
                    raise OSError(f"{self.path}: file ends before row {stop}")
                done += got
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows in any order (re-ranking): a read-only map, touched pages are the page cache's."""
        mapped = np.load(self.path, mmap_mode="r")
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[order] = mapped[rows[order]]
        return out


# ---------------------------------------------------------------------------------------------
# The plan: which index, how many shards, what it costs.


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # flat | ivf_flat | ivf_pq
    n: int
    dim: int
    kk: int  # neighbours searched per query: k + 1, so that self can be dropped
    budget_bytes: int
    shard_rows: int  # flat: database rows per shard
    block_rows: int  # flat with several shards: queries whose running top-k is held at once
    nlist: int = 0
    nprobe: int = 0  # 0: calibrate
    train_size: int = 0
    pq_m: int = 0
    shortlist: int = 0  # ivf_pq: neighbours fetched before exact re-ranking
    reason: str = ""

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n / self.shard_rows) if self.kind == "flat" else 1

    @property
    def faiss_name(self) -> str:
        return {"flat": "IndexFlatIP", "ivf_flat": "IndexIVFFlat", "ivf_pq": "IndexIVFPQ+exact-rerank"}[self.kind]

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "n_shards": self.n_shards, "index": self.faiss_name}


def default_nlist(n: int) -> int:
    nlist = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    return max(1, min(nlist, n // 39, 65536))


def default_pq_m(dim: int) -> int:
    # About 4 dimensions or more per one-byte code: 16x smaller than float32, re-ranking restores order.
    return next(m for m in PQ_M_CHOICES if dim % m == 0 and m <= max(1, dim // 4))


def _ivf_bytes(kind: str, n: int, dim: int, nlist: int, pq_m: int) -> int:
    per_vector = dim * FLOAT32 if kind == "ivf_flat" else pq_m
    tables = nlist * dim * FLOAT32 + (256 * dim * FLOAT32 if kind == "ivf_pq" else 0)
    return n * (per_vector + 8) + tables


def choose_index(mining: MiningConfig, n: int, dim: int) -> IndexPlan:
    """The search strategy for n vectors of dimension dim under mining.memory_budget."""
    budget = parse_bytes(mining.memory_budget)
    kk = min(mining.k + 1, max(n, 1))
    batch = min(mining.query_batch_size, max(n, 1))
    # The query batch, its results and their Arrow tables, and the id column stay resident.
    fixed = n * ID_BYTES + batch * (dim * FLOAT32 + kk * 48) + SCRATCH_BYTES + tile_bytes(budget)
    avail = budget - fixed
    if avail <= 0:
        raise MiningResourceError(
            f"mining.memory_budget ({mining.memory_budget}) is below the fixed cost of mining "
            f"{n} vectors ({fixed / 2**20:.0f} MiB: ids, one query batch, scratch); raise it"
        )
    index_share = int(avail * 0.75)  # the rest holds the running top-k of a query block

    nlist = min(mining.nlist or default_nlist(n), max(n, 1))
    pq_m = mining.pq_m or default_pq_m(dim)
    kind, reason = mining.index, f"mining.index is '{mining.index}'"
    if kind == "auto":
        if n <= mining.exact_max_vectors:
            kind, reason = "flat", f"N={n} <= exact_max_vectors={mining.exact_max_vectors}: exact"
        elif _ivf_bytes("ivf_flat", n, dim, nlist, pq_m) <= index_share:
            kind, reason = "ivf_flat", f"N={n} > exact_max_vectors and the vectors fit the budget"
        else:
            kind, reason = "ivf_pq", f"N={n} > exact_max_vectors and the vectors exceed the budget"

    if kind == "flat":
        fits = max(1, index_share // (dim * FLOAT32))
        shard_rows = min(mining.shard_rows or fits, max(n, 1))
        n_shards = math.ceil(max(n, 1) / shard_rows)
        shard_rows = math.ceil(max(n, 1) / n_shards)  # equal shards, none a sliver
        block_rows = max(batch, int(avail - shard_rows * dim * FLOAT32) // (kk * 12))
        return IndexPlan("flat", n, dim, kk, budget, shard_rows, block_rows, reason=reason)

    if kind == "ivf_pq" and dim % pq_m:
        raise MiningResourceError(f"mining.pq_m ({pq_m}) must divide the vector dimension ({dim})")
    need = _ivf_bytes(kind, n, dim, nlist, pq_m)
    if need > index_share:
        raise MiningResourceError(
            f"a {kind} index of {n} x {dim} vectors needs about {need / 2**30:.1f} GiB but "
            f"mining.memory_budget ({mining.memory_budget}) leaves {index_share / 2**30:.1f} GiB for it; "
            "raise the budget" + (" or use index: ivf_pq" if kind == "ivf_flat" else " or lower pq_m")
        )
    train = min(n, mining.train_size or max(64 * nlist, 10_000))
    shortlist = min(max(n, 1), kk * mining.rerank_factor) if kind == "ivf_pq" else 0
    nprobe = min(mining.nprobe, nlist) if mining.nprobe else 0
    return IndexPlan(kind, n, dim, kk, budget, max(n, 1), max(n, 1), nlist, nprobe, train,
                     pq_m if kind == "ivf_pq" else 0, shortlist, reason)


# ---------------------------------------------------------------------------------------------
# Devices.


@dataclass(frozen=True)
class Device:
    kind: str  # cpu | cuda
    gpus: tuple[int, ...] = ()
    float16: bool = False


def faiss_gpu_count() -> int:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def resolve_device(mining: MiningConfig) -> Device:
    if mining.device == "cpu":
        return Device("cpu")
    available = faiss_gpu_count()
    if not available:
        if mining.device == "cuda":
            raise MiningResourceError(
                "mining.device is 'cuda' but faiss has no GPU support or sees no GPU; install "
                "faiss-gpu-cu12 (requirements-gpu.txt) on a CUDA worker, or set mining.device: cpu"
            )
        return Device("cpu")
    n = min(mining.gpus or available, available)
    return Device("cuda", tuple(range(n)), mining.gpu_float16)


# ---------------------------------------------------------------------------------------------
# Top-k helpers.


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


# ---------------------------------------------------------------------------------------------
# Exact search, sharded.


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
        shard = _GpuFlat(data, self.device) if self.device.kind == "cuda" else _CpuFlat(data, self.plan.budget_bytes)
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


class _CpuFlat:
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


class _GpuFlat:
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


# ---------------------------------------------------------------------------------------------
# Approximate search: a trained IVF index on disk, shared by all work items of an encoder.


def build_ivf(vectors: VectorFile, plan: IndexPlan, device: Device, seed: int):
    import faiss

    dim = plan.dim
    quantizer = faiss.IndexFlatIP(dim)
    if plan.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(vectors.n, size=plan.train_size, replace=False))
    train = vectors.take(sample)
    if device.kind == "cuda":
        # k-means assignment on the GPU; the trained index itself is a CPU index we persist.
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = int(device.gpus[0])
        clustering = faiss.GpuIndexFlatIP(res, dim, cfg)  # referenced here: FAISS does not own it
        index.clustering_index = clustering
    index.train(train)
    del train
    index.clustering_index = None
    target = index
    if device.kind == "cuda":
        target = faiss.index_cpu_to_gpus_list(index, co=_cloner(device, plan, shard=False), gpus=[device.gpus[0]])
    chunk = max(1, (64 * 2**20) // vectors.row_bytes)
    for a in range(0, vectors.n, chunk):
        target.add(vectors.read(a, min(a + chunk, vectors.n)))
    return faiss.index_gpu_to_cpu(target) if target is not index else index


def _cloner(device: Device, plan: IndexPlan, shard: bool):
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.shard = shard
    # IVF-PQ lookup tables of many sub-quantizers only fit GPU shared memory in float16;
    # the shortlist is re-ranked in float32 anyway.
    co.useFloat16 = device.float16 or plan.kind == "ivf_pq"
    return co


class IvfSearcher:
    """Search a trained IVF index; IVF-PQ shortlists are re-ranked with exact inner products."""

    def __init__(self, vectors: VectorFile, plan: IndexPlan, device: Device, batch: int, index):
        import faiss

        self.vectors, self.plan, self.device, self.batch = vectors, plan, device, batch
        self.cpu_index, self.nprobe = index, plan.nprobe or max(1, plan.nlist // 16)
        self.gpu_index = None
        self.lists = None
        if device.kind == "cuda":
            self.gpu_index = faiss.index_cpu_to_gpus_list(index, co=_cloner(device, plan, shard=True),
                                                          gpus=list(device.gpus))
            self._params = faiss.GpuParameterSpace()
        elif plan.kind == "ivf_flat":
            self.lists = _inverted_lists(index, plan.dim)

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = nprobe
        if self.gpu_index is not None:
            self._params.set_index_parameter(self.gpu_index, "nprobe", nprobe)
        else:
            self.cpu_index.nprobe = nprobe

    def search_queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kk = self.plan.kk
        # Grouping pays once lists are shared by enough queries of the batch; below that, FAISS's
        # per-query scan is as fast and has no per-list overhead.
        grouped = len(queries) * self.nprobe >= GROUPED_MIN_QUERIES_PER_LIST * self.plan.nlist
        if self.plan.kind == "ivf_flat" and self.gpu_index is None and grouped:
            return self._grouped_scan(queries, kk)
        k = self.plan.shortlist if self.plan.kind == "ivf_pq" else kk
        if self.gpu_index is not None and k > GPU_MAX_K:
            raise MiningResourceError(f"FAISS on GPU returns at most {GPU_MAX_K} neighbours; lower k or rerank_factor")
        sims, rows = (self.gpu_index or self.cpu_index).search(queries, k)
        if self.plan.kind == "ivf_pq":
            sims, rows = self._rerank(queries, rows, kk)
        return sims, rows

    def search(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for a in range(start, stop, self.batch):
            b = min(a + self.batch, stop)
            yield a, *self.search_queries(self.vectors.read(a, b))

    def _rerank(self, queries: np.ndarray, rows: np.ndarray, k: int):
        # Exact sims for the shortlist, a few hundred queries at a time so the gathered rows stay small.
        sims = np.full(rows.shape, -np.inf, dtype=np.float32)
        step = max(1, (32 * 2**20) // (rows.shape[1] * self.vectors.row_bytes))
        for a in range(0, len(rows), step):
            r = rows[a:a + step]
            valid = r >= 0
            gathered = self.vectors.take(r[valid]).reshape(-1, self.plan.dim)
            block = np.full(r.shape, -np.inf, dtype=np.float32)
            q_of = np.broadcast_to(np.arange(len(r))[:, None], r.shape)[valid]
            block[valid] = np.einsum("nd,nd->n", gathered, queries[a:a + step][q_of])
            sims[a:a + step] = block
        return topk_rows(sims, rows, k)

    def _grouped_scan(self, queries: np.ndarray, k: int):
        """IVF-Flat search batched by inverted list: every list is read once per query batch and
        scored against all queries probing it with one matrix product, instead of once per query."""
        nq, nprobe = len(queries), self.nprobe
        _, probes = self.cpu_index.quantizer.search(queries, nprobe)
        best_d = np.full((nq, nprobe, k), -np.inf, dtype=np.float32)
        best_i = np.full((nq, nprobe, k), -1, dtype=np.int64)
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        sorted_lists = flat[order]
        bounds = np.searchsorted(sorted_lists, np.arange(self.plan.nlist + 1))
        for lst in np.unique(sorted_lists[sorted_lists >= 0]):
            vecs, ids = self.lists[lst]
            if not len(ids):
                continue
            sel = order[bounds[lst]:bounds[lst + 1]]
            q, slot = sel // nprobe, sel % nprobe
            sims = queries[q] @ vecs.T
            if len(ids) > k:  # unsorted best k per query; the final top-k sorts
                part = np.argpartition(sims, len(ids) - k, axis=1)[:, -k:]
                best_d[q, slot], best_i[q, slot] = np.take_along_axis(sims, part, 1), ids[part]
            else:
                best_d[q, slot, : len(ids)], best_i[q, slot, : len(ids)] = sims, ids
        return topk_rows(best_d.reshape(nq, -1), best_i.reshape(nq, -1), k)


def _inverted_lists(index, dim: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Zero-copy numpy views of an IVF-Flat index's lists (vectors, database rows)."""
    import faiss

    invlists = faiss.extract_index_ivf(index).invlists
    out = []
    for lst in range(invlists.nlist):
        size = invlists.list_size(lst)
        if not size:
            out.append((np.empty((0, dim), np.float32), np.empty(0, np.int64)))
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * dim * FLOAT32)
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
        out.append((codes.view(np.float32).reshape(size, dim), ids))
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Recall@k over queries (rows of `truth` are true neighbours, -1 = none): (mean, one-sided 95%
    lower confidence bound of the mean), so a target met by the bound holds beyond the sample."""
    per_query = np.array([len(np.intersect1d(f[f >= 0], t[t >= 0])) / (t >= 0).sum()
                          for f, t in zip(found, truth) if (t >= 0).any()])
    if len(per_query) < 2:
        return (float(per_query.mean()),) * 2 if len(per_query) else (1.0, 1.0)
    mean = float(per_query.mean())
    return mean, mean - 1.645 * float(per_query.std(ddof=1)) / math.sqrt(len(per_query))


def exact_truth(vectors: VectorFile, queries: np.ndarray, rows: np.ndarray, k: int, plan: IndexPlan,
                device: Device) -> np.ndarray:
    """Exact top-k database rows of `queries` (which are rows `rows`), self excluded."""
    kk = min(k + 1, vectors.n)
    best_d = np.full((len(queries), kk), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), kk), -1, dtype=np.int64)
    shard_rows = max(1, plan.budget_bytes // 8 // vectors.row_bytes)  # beside the IVF index
    for s0 in range(0, vectors.n, shard_rows):
        s1 = min(s0 + shard_rows, vectors.n)
        data = vectors.read(s0, s1)
        shard = _GpuFlat(data, device) if device.kind == "cuda" else _CpuFlat(data, plan.budget_bytes)
        d, i = shard.search(queries, min(kk, s1 - s0))
        del shard
        best_d, best_i = merge_topk(best_d, best_i, d, np.where(i >= 0, i + s0, -1), kk)
    return drop_self(best_i, rows, k)


def drop_self(idx: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    keep = (idx != rows[:, None]) & (idx >= 0)
    out = np.full((len(idx), k), -1, dtype=np.int64)
    for r, (line, ok) in enumerate(zip(idx, keep)):
        kept = line[ok][:k]
        out[r, : len(kept)] = kept
    return out


def calibrate_nprobe(searcher: IvfSearcher, vectors: VectorFile, n_queries: int, k: int,
                     target: float, device: Device, seed: int, fixed: int = 0) -> dict[str, Any]:
    """The smallest nprobe whose recall@k on a seeded query sample reaches `target` with 95%
    confidence (the bound, not just the sample mean): doubling, then bisection between the last
    miss and the first hit. With `fixed`, only measures the recall at that nprobe."""
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(vectors.n, size=min(n_queries, vectors.n), replace=False))
    queries = vectors.take(rows)
    truth = exact_truth(vectors, queries, rows, k, searcher.plan, device)
    measured: dict[int, tuple[float, float]] = {}

    def reaches(nprobe: int) -> bool:
        if nprobe not in measured:
            searcher.set_nprobe(nprobe)
            measured[nprobe] = recall_at_k(drop_self(searcher.search_queries(queries)[1], rows, k), truth)
        return measured[nprobe][1] >= target

    nlist, hi = searcher.plan.nlist, fixed or 1
    while not fixed and hi < nlist and not reaches(hi):
        hi = min(2 * hi, nlist)
    lo = hi // 2
    while not fixed and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    if not reaches(hi):
        log.warning("mining: recall@%d is %.3f (95%% bound %.3f) at nprobe=%d, below the target %.3f",
                    k, *measured[hi], hi, target)
    searcher.set_nprobe(hi)
    mean, lower = measured[hi]
    return {"nprobe": hi, "recall": round(mean, 4), "recall_lower_95": round(lower, 4),
            "calibration_queries": len(rows)}


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """One builder at a time per encoder, across the processes of mapped tasks."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_ivf(work_dir: Path, vectors: VectorFile, plan: IndexPlan, mining: MiningConfig,
               device: Device, seed: int) -> tuple[Any, dict]:
    """Load the encoder's trained IVF index, building and calibrating it first if needed."""
    import faiss

    index_path, meta_path = work_dir / "ivf.index", work_dir / "ivf.json"
    with exclusive(work_dir / ".ivf.lock"):
        if not (index_path.is_file() and meta_path.is_file()):
            log.info("mining: training %s (nlist=%d) on %d of %d vectors", plan.faiss_name, plan.nlist,
                     plan.train_size, plan.n)
            index = build_ivf(vectors, plan, device, seed)
            meta: dict[str, Any] = {"nprobe": plan.nprobe or max(1, plan.nlist // 16),
                                    "recall": None, "calibration_queries": 0}
            if mining.calibration_queries:
                searcher = IvfSearcher(vectors, plan, device, mining.query_batch_size, index)
                meta.update(calibrate_nprobe(searcher, vectors, mining.calibration_queries, mining.k,
                                             mining.recall_target, device, seed, fixed=plan.nprobe))
            with atomic_path(index_path) as tmp:
                faiss.write_index(index, str(tmp))
            with atomic_path(meta_path) as tmp:
                tmp.write_text(json.dumps(meta))
            log.info("mining: nprobe=%d, calibrated recall@%d=%s", meta["nprobe"], mining.k, meta["recall"])
            return index, meta
    return faiss.read_index(str(index_path)), json.loads(meta_path.read_text())
