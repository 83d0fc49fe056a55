"""Ingest throughput of the CLI executor: the ingest stage on a sample corpus with N workers
against 1 worker (the baseline) in the same run, alternating repeats, each in a fresh process.

    .venv/bin/python bench/ingest.py [--n 1000] [--workers 2] [--repeats 3] [--corpus DIR]

Prints one JSON object. Per worker count (medians over the repeats): rows; the work items' phase
(rows/s and CPU seconds per wall second: how many cores the items kept busy; process start-up
included); finalize seconds (merge, Polars dedup, the Great Expectations gate); the whole stage's
rows/s; and the speed-ups of N workers over 1 for the items and for the stage.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child(workers: int, corpus: str, out: str) -> dict:
    """One measurement, in this (fresh) process: plan, items, finalize of the ingest stage."""
    from megapairs_ops.pipeline import context_from_params, finalize_stage, get_stage, plan_stage
    from megapairs_ops.pipeline.executor import run_items

    shutil.rmtree(out, ignore_errors=True)
    ctx = context_from_params(REPO / "configs" / "demo.yaml", corpus, out)
    start = time.perf_counter()
    items = plan_stage(ctx, "ingest")
    planned, cpu_before = time.perf_counter(), _cpu_seconds()
    run_items(ctx, get_stage("ingest"), items, workers)
    ran, cpu_after = time.perf_counter(), _cpu_seconds()
    rows = finalize_stage(ctx, "ingest")["items_seen"]
    done = time.perf_counter()
    return {"rows": rows, "items": len(items), "items_s": ran - planned, "items_cpu": cpu_after - cpu_before,
            "finalize_s": done - ran, "stage_s": done - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="sample corpus size (default 1000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", default=None, help="an existing corpus instead of a generated sample")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.child[2])))
        return

    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus or str(Path(tmp) / "corpus")
        if not args.corpus:
            subprocess.run([sys.executable, "-m", "megapairs_ops.cli", "sample-corpus", corpus, "--n", str(args.n),
                            "--seed", "0"], check=True, capture_output=True, cwd=REPO)
        runs: dict[int, list[dict]] = {1: [], args.workers: []}
        for _ in range(args.repeats):
            for workers in runs:
                proc = subprocess.run([sys.executable, __file__, "--child", str(workers), corpus, str(Path(tmp) / "run")],
                                      check=True, capture_output=True, text=True, cwd=REPO)
                runs[workers].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    result: dict = {"corpus": args.corpus or f"sample n={args.n}", "repeats": args.repeats}
    for workers, done in runs.items():
        med = lambda key: statistics.median(r[key] for r in done)  # noqa: E731
        result[f"workers_{workers}"] = {
            "rows": done[0]["rows"],
            "work_items": done[0]["items"],
            "items_rows_per_s": round(done[0]["rows"] / med("items_s"), 1),
            "items_cpu_s_per_wall_s": round(statistics.median(r["items_cpu"] / r["items_s"] for r in done), 2),
            "finalize_s": round(med("finalize_s"), 2),
            "stage_rows_per_s": round(done[0]["rows"] / med("stage_s"), 1),
        }
    one, many = result["workers_1"], result[f"workers_{args.workers}"]
    result[f"items_speedup_{args.workers}_over_1"] = round(many["items_rows_per_s"] / one["items_rows_per_s"], 3)
    result[f"stage_speedup_{args.workers}_over_1"] = round(many["stage_rows_per_s"] / one["stage_rows_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
