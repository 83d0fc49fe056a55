"""IVF search for corpora above `mining.exact_max_vectors`: IVF-Flat, or IVF-PQ whose shortlist
is re-ranked exactly from vectors.npy; the index is trained once per encoder (under a lock across
processes) and its nprobe calibrated against exact ground truth to reach `mining.recall_target`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megapairs_ops.config import MiningConfig
from megapairs_ops.storage import atomic_path

from .flat import CpuFlat, GpuFlat, merge_topk, topk_rows
from .index import FLOAT32, GPU_MAX_K, Device, IndexPlan, MiningResourceError, VectorFile, exclusive

log = logging.getLogger("megapairs")

# IVF-Flat on CPU scores a list against all its queries at once when it has at least this many on
# average (4x faster than FAISS's per-query scan at 16k-query batches on 1M vectors).
GROUPED_MIN_QUERIES_PER_LIST = 8


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
        shard = GpuFlat(data, device) if device.kind == "cuda" else CpuFlat(data, plan.budget_bytes)
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
