"""k-NN search for mining: the index choice and what every engine shares (vectors.npy read with
pread, the memory plan, the device). The engines: flat.py (exact, sharded) and ivf.py (IVF).

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

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megapairs_ops.config import MiningConfig, parse_bytes
from megapairs_ops.errors import ResourceLimitError

log = logging.getLogger("megapairs")


FLOAT32 = 4


# Per-process scratch outside our own arrays (FAISS buffers, Arrow batches, allocator slack), on top
# of the exact search's score tile.
SCRATCH_BYTES = 96 * 2**20  # bench/mine.py measures mining's peak against its budget


# Arrow id column (16-char string + offset) and a Python object per id are never both held.
ID_BYTES = 24


# FAISS GPU kernels select at most this many neighbours per query.
GPU_MAX_K = 2048


# Sub-quantizer counts FAISS GPU IVF-PQ supports; CPU takes any divisor but one rule serves both.
PQ_M_CHOICES = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 2, 1)


class MiningResourceError(ResourceLimitError):
    """The configured index, device or memory budget cannot serve this corpus."""


def tile_bytes(budget: int) -> int:
    """The exact search's score tile (queries x database rows): wide tiles keep sgemm near its peak
    (16k columns for a 4k-query batch), small budgets get narrower ones."""
    return int(min(256 * 2**20, max(16 * 2**20, budget // 16)))


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
