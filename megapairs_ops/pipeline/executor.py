"""The CLI's executor: a stage's work items in this process or in a pool of worker processes.

Items whose resources allow it (CPU-bound: ingest, CPU embedding) run side by side in up to
`--workers` processes (default: every core), each with its share of the cores for its numeric
libraries; the others run here one batch at a time, so a model loads once. Every item commits
itself (storage.WorkDir), so a killed run resumes at the first unfinished item, whoever ran it.
Airflow is the other executor of the same items: one mapped task per batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from .context import RunContext
from .stage import Stage

log = logging.getLogger("megapairs")

# A worker process costs about half a second before its first item (interpreter, imports, config:
# measured on the ingest items of bench/ingest.py), about what one 512-image ingest item takes.
# With fewer items per process than this the pool loses to one process's threads, so the items
# run here instead.
MIN_ITEMS_PER_PROCESS = 2
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_worker_ctx: dict[str, RunContext] = {}


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_share() -> int:
    """The cores this process may keep busy: all of them, or its share in the process pool."""
    return int(os.environ.get("MEGAPAIRS_CPU_SHARE") or default_workers())


def run_items(ctx: RunContext, stage: Stage, items: list[dict[str, Any]], workers: int) -> None:
    from .runner import run_batch, task_batches

    parallel = [i for i in items if stage.resources(ctx.cfg, i).processes]
    serial = [i for i in items if not stage.resources(ctx.cfg, i).processes]
    for batch in task_batches(ctx, stage.name, serial):
        run_batch(ctx, stage.name, batch)
    todo = [i for i in parallel if not stage.is_done(ctx, i)]
    if not todo:
        return
    workers = min(max(1, workers), len(todo) // MIN_ITEMS_PER_PROCESS or 1)
    if workers == 1:  # in this process, its items' threads on every core (cpu_share)
        run_batch(ctx, stage.name, todo)
        return
    threads = max(1, default_workers() // workers)
    log.info("%s: %d work items in %d processes (%d thread(s) each)", stage.name, len(todo), workers, threads)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=(threads,)) as pool:
        params = ctx.params()
        # Every process gets its share of the items up front, interleaved (item i to process
        # i mod workers): all of them start working at once, whichever starts first, and items
        # of one size (ranges, shards) give each the same load. Each item still commits alone.
        shares = [todo[w::workers] for w in range(workers)]
        futures = [pool.submit(_run_in_worker, params, stage.name, share) for share in shares]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _init_worker(threads: int) -> None:
    for var in (*_THREAD_VARS, "MEGAPAIRS_CPU_SHARE"):
        os.environ[var] = str(threads)
    logging.basicConfig(level=logging.WARNING)


def _run_in_worker(params: dict[str, Any], stage: str, items: list[dict[str, Any]]) -> None:
    from .runner import run_batch

    key = repr(sorted(params.items()))
    ctx = _worker_ctx.get(key)
    if ctx is None:
        ctx = _worker_ctx.setdefault(key, RunContext.from_params(params))
    run_batch(ctx, stage, items)
