"""Ingest throughput of the CLI executor: `megapairs run --until ingest --workers N` on the bundled
sample corpus, N workers against 1 worker in the same run (the baseline), alternating repeats.

    .venv/bin/python bench/ingest.py [--n 1000] [--workers 2] [--repeats 3] [--corpus DIR]

Prints one JSON object: per worker count the rows, each repeat's wall seconds (the whole command:
interpreter start and process pool included) and the median rows/s, the CPU seconds the command
used per wall second (how many cores it kept busy), and the speed-up of N workers over 1.
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
MEGAPAIRS = [sys.executable, "-m", "megapairs_ops.cli"]


def run_once(corpus: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*MEGAPAIRS, "run", "--config", str(REPO / "configs" / "demo.yaml"), "--corpus", str(corpus),
                    "--out", str(out), "--until", "ingest", "--workers", str(workers)],
                   check=True, capture_output=True, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = json.loads((out / "_status" / "ingest.json").read_text())["items_seen"]
    return {"rows": rows, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="sample corpus size (default 1000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", default=None, help="an existing corpus instead of a generated sample")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus"
        if not args.corpus:
            subprocess.run([*MEGAPAIRS, "sample-corpus", str(corpus), "--n", str(args.n), "--seed", "0"],
                           check=True, capture_output=True, cwd=REPO)
        counts = (1, args.workers)
        runs: dict[int, list[dict]] = {w: [] for w in counts}
        for _ in range(args.repeats):
            for workers in counts:
                runs[workers].append(run_once(corpus, Path(tmp) / "run", workers))
    result: dict = {"corpus": args.corpus or f"sample n={args.n}"}
    for workers, done in runs.items():
        wall = statistics.median(r["wall"] for r in done)
        result[f"workers_{workers}"] = {
            "rows": done[0]["rows"],
            "wall_s": [round(r["wall"], 2) for r in done],
            "rows_per_s": round(done[0]["rows"] / wall, 1),
            "cpu_s_per_wall_s": round(statistics.median(r["cpu"] / r["wall"] for r in done), 2),
        }
    result[f"speedup_{args.workers}_over_1"] = round(
        result[f"workers_{args.workers}"]["rows_per_s"] / result["workers_1"]["rows_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
