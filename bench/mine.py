"""Mining benchmark: exact search against sgemm, approximate search against exact, and the DuckDB
pairs stage at 50M candidate rows. Prints one JSON object.

    .venv/bin/python bench/mine.py [--quick] [--skip exact,approx,pairs]

* efficiency: exact top-k search (the mining engine, one shard) in effective GFLOP/s = 2*Nq*N*d/t,
  over numpy sgemm GFLOP/s on the same shapes (Nq x d times d x N, tiled into a reused output),
  same thread count, measured alternately; best of the rounds for both (the machine is shared).
* recall, speedup: approximate mode (IVF, nprobe calibrated to mining.recall_target) on clustered
  data, N=1M, d=512: recall@k against exact and per-query time of exact / approximate on the same
  sample of queries. Index build and calibration time are reported separately.
* pairs_rows_per_s, pairs_peak_rss_mb: build_pairs on 50M candidate rows in a fresh process
  (peak RSS = ru_maxrss, DuckDB included), with its memory_limit; the baseline is DuckDB scanning
  the same candidate and neighbour files (pairs_vs_scan).
* mine_peak_rss_mb: a whole sharded exact mining run in a fresh process against its memory budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megapairs_ops.config import parse_config  # noqa: E402
from megapairs_ops.layout import RunLayout  # noqa: E402

HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def log(msg: str) -> None:
    print(f"[bench/mine {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hex_ids(values: np.ndarray) -> pa.Array:
    """16-hex-char image ids for integers, built as one Arrow buffer (fast for millions)."""
    v = values.astype(np.uint64)
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    chars = HEX[((v[:, None] >> shifts) & np.uint64(15)).astype(np.intp)]
    offsets = np.arange(0, 16 * len(v) + 1, 16, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(v), [None, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())])


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Samples this process's anonymous resident memory (heap and DuckDB buffers, not the pages of
    loaded libraries) every 20 ms and keeps the maximum."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now_mb())


def clustered(n: int, dim: int, seed: int, sigma=(0.3, 0.6), per_cluster: int = 50) -> np.ndarray:
    """Unit vectors around n/per_cluster random centres; noise per cluster drawn from `sigma`,
    which puts within-cluster cosine similarities at about 0.75-0.9, the mining band's region."""
    rng = np.random.default_rng(seed)
    n_centres = max(1, n // per_cluster)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.uniform(*sigma, n_centres).astype(np.float32) / np.sqrt(dim, dtype=np.float32)
    labels = rng.integers(0, n_centres, n)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        block = rng.standard_normal((b - a, dim), dtype=np.float32)
        block *= noise[labels[a:b], None]
        block += centres[labels[a:b]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[a:b] = block
    return out


def write_embeddings(layout: RunLayout, name: str, vectors: np.ndarray) -> None:
    layout.embedding_dir(name).mkdir(parents=True, exist_ok=True)
    np.save(layout.embedding_vectors(name), vectors)
    pq.write_table(pa.table({"image_id": hex_ids(np.arange(len(vectors)))}), layout.embedding_ids(name))


# ------------------------------------------------------------------------------------------------
# exact vs sgemm


def bench_exact(args) -> dict:
    import faiss

    from megapairs_ops.stages.mine.flat import FlatSearcher
    from megapairs_ops.stages.mine.index import Device, VectorFile, choose_index

    n, dim, nq, k = args.exact_n, args.dim, args.exact_queries, args.k
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "vectors.npy"
        np.save(path, data)
        vectors = VectorFile(path)
        cfg = parse_config({"encoders": [{"name": "e", "kind": "classic_texture"}],
                            "mining": {"k": k, "index": "flat", "memory_budget": "16GB", "query_batch_size": nq}})
        plan = choose_index(cfg.mining, n, dim)
        searcher = FlatSearcher(vectors, plan, Device("cpu"), nq)
        for _ in searcher.search(0, nq):  # warm-up: loads the shard, sizes the score tile
            pass
        queries = data[:nq]
        tile = 16384
        out = np.empty((nq, tile), dtype=np.float32)
        flops = 2.0 * nq * n * dim

        def sgemm_gflops() -> float:
            t0 = time.perf_counter()
            for a in range(0, n, tile):
                b = min(a + tile, n)
                np.matmul(queries, data[a:b].T, out=out[:, : b - a])
            return flops / (time.perf_counter() - t0) / 1e9

        # Each round brackets the exact search with two sgemm runs, so a round's ratio compares
        # runs under the same load; the machine is shared, so the median round is reported.
        sgemm, exact, ratios = [], [], []
        for _ in range(args.rounds):
            before = sgemm_gflops()
            t0 = time.perf_counter()
            for _ in searcher.search(0, nq):
                pass
            exact.append(flops / (time.perf_counter() - t0) / 1e9)
            sgemm.append((before + sgemm_gflops()) / 2)
            ratios.append(exact[-1] / sgemm[-1])
            log(f"exact round: sgemm {sgemm[-1]:.1f} GFLOP/s, exact top-{k} search {exact[-1]:.1f} GFLOP/s")
    return {
        "efficiency": round(float(np.median(ratios)), 3),
        "efficiency_per_round": [round(r, 3) for r in ratios],
        "exact_gflops": round(max(exact), 1),
        "sgemm_gflops": round(max(sgemm), 1),
        "exact_shape": {"n": n, "queries": nq, "dim": dim, "k": k},
        "threads": {"faiss_omp": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count()},
    }


# ------------------------------------------------------------------------------------------------
# approximate vs exact


def bench_approx(args) -> dict:
    from megapairs_ops.stages.mine.flat import CpuFlat
    from megapairs_ops.stages.mine.index import Device, VectorFile, choose_index
    from megapairs_ops.stages.mine.ivf import IvfSearcher, drop_self, ensure_ivf, recall_at_k

    n, dim, k, nq = args.approx_n, args.dim, args.k, args.approx_queries
    t0 = time.perf_counter()
    data = clustered(n, dim, seed=1)
    log(f"approx: generated {n} x {dim} clustered vectors in {time.perf_counter() - t0:.1f}s")
    rows = np.sort(np.random.default_rng(7).choice(n, nq, replace=False))
    queries = data[rows]
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "vectors.npy"
        np.save(path, data)
        vectors = VectorFile(path)
        log(f"approx: {n} x {dim} written; exact search of {nq} queries is the baseline")
        exact_search = CpuFlat(data, 8 * 2**30)
        sims, idx = exact_search.search(queries, k + 1)
        truth = drop_self(idx, rows, k)
        exact_times: list[float] = []
        for kind in args.approx_kinds:
            cfg = parse_config({"encoders": [{"name": "e", "kind": "classic_texture"}],
                                "mining": {"k": k, "index": kind, "memory_budget": "12GB",
                                           "recall_target": args.recall_target,
                                           "calibration_queries": args.calibration_queries}})
            plan = choose_index(cfg.mining, n, dim)
            t0 = time.perf_counter()
            index, meta = ensure_ivf(Path(tmp) / kind, vectors, plan, cfg.mining, Device("cpu"), seed=0)
            build_s = time.perf_counter() - t0
            searcher = IvfSearcher(vectors, plan, Device("cpu"), 4096, index)
            searcher.set_nprobe(meta["nprobe"])
            ratios, approx_times = [], []
            for _ in range(args.rounds):  # exact and approximate alternate: each ratio under one load
                t0 = time.perf_counter()
                exact_search.search(queries, k + 1)
                exact_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                found = np.concatenate([searcher.search_queries(queries[a:a + 4096])[1]
                                        for a in range(0, nq, 4096)])
                approx_times.append(time.perf_counter() - t0)
                ratios.append(exact_times[-1] / approx_times[-1])
            recall = recall_at_k(drop_self(found, rows, k), truth)[0]
            results[kind] = {
                "recall": round(recall, 4), "speedup": round(float(np.median(ratios)), 1),
                "speedup_per_round": [round(r, 1) for r in ratios], "nlist": plan.nlist,
                "nprobe": meta["nprobe"], "calibrated_recall": meta["recall"],
                "calibrated_recall_lower_95": meta["recall_lower_95"],
                "build_and_calibrate_s": round(build_s, 1), "search_s": round(min(approx_times), 2),
                **({"pq_m": plan.pq_m, "shortlist": plan.shortlist} if kind == "ivf_pq" else {}),
            }
            log(f"approx {kind}: {results[kind]}")
            del index, searcher
        exact_s = float(np.median(exact_times))
        del data, exact_search
    head = results[args.approx_kinds[0]]
    return {
        "recall": head["recall"], "speedup": head["speedup"], "approx_index": args.approx_kinds[0],
        "approx": results, "approx_exact_s": round(exact_s, 2),
        "approx_shape": {"n": n, "queries": nq, "dim": dim, "k": k, "recall_target": args.recall_target},
    }


# ------------------------------------------------------------------------------------------------
# sharded exact mining under a memory budget, in a fresh process


def bench_mine_rss(args) -> dict:
    from megapairs_ops.stages.mine.index import ID_BYTES, SCRATCH_BYTES, tile_bytes

    n, dim = args.rss_n, args.dim
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        layout = RunLayout(Path(tmp))
        write_embeddings(layout, "e", clustered(n, dim, seed=3))
        # What choose_index sets aside (ids, one batch, scratch) plus half the vectors: several shards.
        fixed = n * ID_BYTES + 4096 * (dim * 4 + (args.k + 1) * 48) + SCRATCH_BYTES
        budget = fixed + n * dim * 2
        budget += tile_bytes(budget)
        child = subprocess.run(
            [sys.executable, __file__, "--mine-child", tmp, str(budget), str(args.k)],
            capture_output=True, text=True, check=True,
        )
        result = json.loads(child.stdout)
    result["mine_budget_mb"] = round(budget / 2**20)
    log(f"mine rss: {result}")
    return result


def mine_child(run_dir: str, budget: int, k: int) -> None:
    import faiss  # noqa: F401  (libraries are the process's baseline, not mining data)

    from megapairs_ops.stages.mine.work import mine_candidates

    base, anon_base = peak_rss_mb(), AnonPeak.now_mb()
    cfg = parse_config({"encoders": [{"name": "e", "kind": "classic_texture", "band": [0.5, 0.96]}],
                        "mining": {"k": k, "index": "flat", "memory_budget": budget}})
    sampler = AnonPeak()
    t0 = time.perf_counter()
    stats = mine_candidates(cfg, "e", RunLayout(Path(run_dir)))
    anon = sampler.stop() - anon_base
    print(json.dumps({
        "mine_peak_rss_mb": round(peak_rss_mb()), "mine_rss_before_mb": round(base),
        "mine_peak_anon_mb": round(anon), "mine_anon_over_budget": round(anon / (budget / 2**20), 3),
        "mine_shards": stats["index_plan"]["n_shards"], "mine_s": round(time.perf_counter() - t0, 1),
        "mine_vectors_mb": round(stats["queries"] * stats["index_plan"]["dim"] * 4 / 2**20),
    }))


# ------------------------------------------------------------------------------------------------
# pairs stage at 50M candidate rows


ENCODERS = ("visual_semantic", "visual_pattern", "caption")


def write_pairs_inputs(layout: RunLayout, n_images: int, k: int, seed: int = 0) -> dict:
    """Candidates and neighbours shaped like mining output: per encoder and query, k neighbours with
    falling sims, those inside (0.8, 0.96) as candidates (at most 3). Targets come from a window of
    nearby ids with a small jitter per encoder, so views often agree on a pair."""
    rng = np.random.default_rng(seed)
    ids = hex_ids(np.arange(n_images) * 2654435761 % (1 << 62))
    phash = rng.integers(-(1 << 63), (1 << 63) - 1, n_images, dtype=np.int64)
    twins = np.arange(0, n_images - 1, 97)  # ~1% of images have a perceptual twin next to them
    phash[twins + 1] = phash[twins] ^ 1
    layout.images.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": ids, "phash": phash}), layout.images)
    counts = {"candidate_rows": 0, "neighbour_rows": 0}
    chunk = 1_000_000
    for enc in ENCODERS:
        for kind in ("candidates", "neighbours"):
            getattr(layout, kind)(enc).parent.mkdir(parents=True, exist_ok=True)
        with (pq.ParquetWriter(layout.candidates(enc), _SCHEMA, compression="zstd") as cw,
              pq.ParquetWriter(layout.neighbours(enc), _SCHEMA, compression="zstd") as nw):
            for a in range(0, n_images, chunk):
                b = min(n_images, a + chunk)
                q = np.arange(a, b)
                offsets = 1 + 3 * np.arange(k) + rng.integers(0, 3, (b - a, k))
                t = (q[:, None] + offsets) % n_images
                base = rng.uniform(0.86, 1.0, (b - a, 1))
                sims = (base - 0.03 * np.arange(k) - rng.uniform(0, 0.02, (b - a, k))).astype(np.float32)
                rank = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), sims.shape)
                qq = np.broadcast_to(q[:, None], t.shape)
                nw.write_table(_rows(ids, qq.ravel(), t.ravel(), sims.ravel(), rank.ravel()))
                band = (sims > 0.8) & (sims < 0.96)
                band &= np.cumsum(band, axis=1) <= 3
                cw.write_table(_rows(ids, qq[band], t[band], sims[band], rank[band]))
                counts["candidate_rows"] += int(band.sum())
                counts["neighbour_rows"] += t.size
    return counts


_SCHEMA = pa.schema([("q_id", pa.string()), ("t_id", pa.string()), ("sim", pa.float32()), ("rank", pa.int32())])


def _rows(ids, q, t, sim, rank) -> pa.Table:
    return pa.table({"q_id": ids.take(pa.array(q)), "t_id": ids.take(pa.array(t)),
                     "sim": pa.array(sim), "rank": pa.array(rank, pa.int32())}, schema=_SCHEMA)


def pairs_config(memory_limit: str, threads: int | None):
    return parse_config({
        "encoders": [{"name": e, "kind": "classic_texture", "band": [0.8, 0.96]} for e in ENCODERS],
        "mining": {"k": 32, "max_targets_per_query": 3, "n_hard_negatives": 5},
        "pairs": {"max_pairs_per_query": 3, "near_duplicate_hamming": 6},
        "duckdb": {"memory_limit": memory_limit, **({"threads": threads} if threads else {})},
    })


def bench_pairs(args) -> dict:
    rows_per_image = 3 * 2.95  # three encoders, about three in-band candidates each
    n_images = int(args.pairs_rows / rows_per_image)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        layout = RunLayout(Path(tmp))
        t0 = time.perf_counter()
        counts = write_pairs_inputs(layout, n_images, args.pairs_k)
        log(f"pairs: wrote {counts} for {n_images} images in {time.perf_counter() - t0:.0f}s")
        child = subprocess.run(
            [sys.executable, __file__, "--pairs-child", tmp, args.pairs_memory_limit, str(args.pairs_threads or 0)],
            capture_output=True, text=True,
        )
        if child.returncode:
            raise RuntimeError(f"pairs child failed: {child.stderr[-3000:]}")
        result = json.loads(child.stdout)
    result.update(counts)
    result["pairs_images"] = n_images
    result["pairs_rows_per_s"] = round(result["candidate_rows_seen"] / result["pairs_s"])
    result["pairs_vs_scan"] = round(result["pairs_rows_per_s"] / result["scan_rows_per_s"], 4)
    log(f"pairs: {result}")
    return result


def pairs_child(run_dir: str, memory_limit: str, threads: int) -> None:
    import duckdb

    from megapairs_ops.stages.pairs import build_pairs

    layout = RunLayout(Path(run_dir))
    cfg = pairs_config(memory_limit, threads or None)
    # Baseline: DuckDB reading every candidate and neighbour row once (no joins, no spilling).
    paths = [str(layout.candidates(e)) for e in ENCODERS] + [str(layout.neighbours(e)) for e in ENCODERS]
    con = duckdb.connect(config={"memory_limit": memory_limit, **({"threads": threads} if threads else {})})
    t0 = time.perf_counter()
    scanned = con.execute("SELECT count(*), sum(length(q_id) + length(t_id)) FROM read_parquet($p)",
                          {"p": paths}).fetchone()[0]
    scan_s = time.perf_counter() - t0
    con.close()
    rss_before = peak_rss_mb()
    sampler = AnonPeak()
    t0 = time.perf_counter()
    stats = build_pairs(cfg, layout)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "pairs_s": round(seconds, 1), "pairs_peak_rss_mb": round(peak_rss_mb()), "pairs_rss_before_mb": round(rss_before),
        "pairs_peak_anon_mb": round(sampler.stop()),
        "pairs_memory_limit": memory_limit, "candidate_rows_seen": stats["candidate_rows"],
        "scan_rows_per_s": round(scanned / scan_s), "pairs_stats": stats,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a couple of minutes")
    parser.add_argument("--skip", default="", help="comma list of: exact, approx, rss, pairs")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    parser.add_argument("--mine-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mine_child:
        return mine_child(args.mine_child[0], int(args.mine_child[1]), int(args.mine_child[2]))
    if args.pairs_child:
        return pairs_child(args.pairs_child[0], args.pairs_child[1], int(args.pairs_child[2]))

    quick = args.quick
    args.dim, args.k, args.rounds = 512, 20, 3 if not quick else 2
    args.exact_n, args.exact_queries = (200_000, 4096) if not quick else (50_000, 2048)
    args.approx_n, args.approx_queries = (1_000_000, 4096) if not quick else (100_000, 1000)
    args.approx_kinds = ["ivf_flat", "ivf_pq"]
    args.recall_target, args.calibration_queries = 0.95, 1000 if not quick else 500
    args.rss_n = 60_000 if not quick else 30_000
    args.pairs_rows = 50_000_000 if not quick else 2_000_000
    args.pairs_k, args.pairs_memory_limit, args.pairs_threads = 8, "6GB" if not quick else "1GB", None
    skip = set(filter(None, args.skip.split(",")))

    out: dict = {"quick": quick, "load_before": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}
    started = time.perf_counter()
    for name, fn in (("exact", bench_exact), ("approx", bench_approx), ("rss", bench_mine_rss), ("pairs", bench_pairs)):
        if name not in skip:
            t0 = time.perf_counter()
            out.update(fn(args))
            out[f"{name}_bench_s"] = round(time.perf_counter() - t0, 1)
            out[f"load_after_{name}"] = [round(x, 2) for x in os.getloadavg()]
    out["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
