"""The generic runner: what every stage shares, whichever executor runs its work items.

A stage key (a stage, or a stage of one encoder) is finished when its status record carries the
fingerprint of its result config and of its upstream stages' results; re-running a finished
stage is a no-op, and changing a config value that defines a result re-runs exactly the stages
downstream of it. Runtime knobs (config.RUNTIME) are in no fingerprint.

    plan_stage(ctx, name)            -> work items of the unfinished keys (a planner per device in
                                        Airflow; the CLI plans once)
    run_batch(ctx, name, items)      -> does the items not yet committed, commits each
    finalize_stage(ctx, name, enc)   -> sweeps temp leftovers, merges, gates, writes the status
    run_stage(ctx, name)             -> all three in this process (the CLI), items through the
                                        executor's process pool where the stage allows it

Each stage's quality gate (Great Expectations) runs before its status is written, so a stage
whose output fails its gate is not finished and the next stage refuses to start.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from megapairs_ops.errors import StageNotReady
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import (
    STAGE_CODE_VERSION,
    clear_dir,
    clear_status,
    is_finished,
    load_status,
    mark_finished,
    sweep_temps,
    write_json,
)

from .context import RunContext
from .registry import all_stages, get_stage, stage_names
from .stage import Device, Stage, stage_key

log = logging.getLogger("megapairs")


# ---------------------------------------------------------------------------------------------
# Fingerprints and finished stages


def stage_keys(ctx: RunContext, stage: Stage, encoder: str | None = None) -> list[str | None]:
    """The encoders a call covers: one, every configured one, or [None] for a plain stage."""
    if not stage.per_encoder:
        if encoder is not None:
            raise ValueError(f"stage '{stage.name}' does not take an encoder")
        return [None]
    if encoder is not None:
        ctx.cfg.encoder(encoder)  # a KeyError naming the configured encoders
        return [encoder]
    return [e.name for e in ctx.cfg.encoders]


def _upstream_keys(ctx: RunContext, stage: Stage, encoder: str | None) -> list[str]:
    keys = []
    for name in stage.upstream:
        up = get_stage(name)
        if not up.per_encoder:
            keys.append(name)
        elif stage.per_encoder:
            keys.append(stage_key(name, encoder))
        else:
            keys += [stage_key(name, e.name) for e in ctx.cfg.encoders]
    return keys


def fingerprint(ctx: RunContext, stage: Stage, encoder: str | None = None) -> str:
    upstream = []
    for key in _upstream_keys(ctx, stage, encoder):
        status = load_status(ctx.layout, key)
        if not status or status.get("state") != "done":
            raise StageNotReady(
                f"stage '{stage_key(stage.name, encoder)}' needs '{key}' to finish first in {ctx.layout.root}"
            )
        # An upstream stage that ran again with the same inputs may have a new result (annotate
        # retrying failures): its execution id makes what follows run again too.
        upstream.append([status["fingerprint"], status.get("execution")])
    return ctx.cfg.section_fingerprint(stage.name, STAGE_CODE_VERSION, *stage.result_config(ctx, encoder), upstream)


def _finished(ctx: RunContext, stage: Stage, encoder: str | None, fp: str) -> bool:
    key = stage_key(stage.name, encoder)
    if not is_finished(ctx.layout, key, fp):
        return False
    return not stage.work_left(load_status(ctx.layout, key) or {})


def _unfinished(ctx: RunContext, stage: Stage, encoder: str | None, force: bool) -> list[str | None]:
    todo = [e for e in stage_keys(ctx, stage, encoder) if force or not _finished(ctx, stage, e, fingerprint(ctx, stage, e))]
    if force:
        for enc in todo:
            clear_status(ctx.layout, stage_key(stage.name, enc))
            stage.work(ctx.layout, enc).clear()
    return todo


# ---------------------------------------------------------------------------------------------
# The three steps


def plan_stage(ctx: RunContext, name: str, device: Device | None = None, encoder: str | None = None,
               force: bool = False) -> list[dict[str, Any]]:
    """Work items of the stage's unfinished keys (with `device`, only those for it); none when
    the stage is finished. Calling it again during an execution gives the same items."""
    stage = get_stage(name)
    todo = [e for e in _unfinished(ctx, stage, encoder, force) if device is None or stage.device(ctx.cfg, e) == device]
    if not todo:
        return []
    for enc in todo:
        clear_status(ctx.layout, stage_key(name, enc))  # no stale record while it runs again
    items = stage.plan(ctx, todo, device)
    return [{**item, "stage": name} for item in items]


def task_batches(ctx: RunContext, name: str, items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Items grouped into the batches one mapped task runs (`*_per_task`)."""
    size = max(1, get_stage(name).per_task(ctx.cfg))
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_batch(ctx: RunContext, name: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Do the items that are not committed yet, committing each as it finishes; returns every
    item's committed stats. Idempotent: a retried task resumes at its first unfinished item."""
    stage = get_stage(name)
    todo = [item for item in items if not stage.is_done(ctx, item)]
    if todo:
        clock = {"t": time.perf_counter()}

        def commit(item: dict[str, Any], stats: dict[str, Any]) -> None:
            now = time.perf_counter()
            # Which process did it (the CLI's pool, an Airflow worker): for the record only.
            stage.commit(ctx, item, {**stats, "item_seconds": round(now - clock["t"], 3), "worker_pid": os.getpid()})
            clock["t"] = now

        stage.run_items(ctx, todo, commit)
        missing = [item["id"] for item in todo if not stage.is_done(ctx, item)]
        if missing:
            raise RuntimeError(f"{name}: work items ran without being committed: {', '.join(missing[:5])}")
    return [stage.committed(ctx, item) for item in items]


def finalize_stage(ctx: RunContext, name: str, encoder: str | None = None) -> dict[str, Any]:
    """Finish one stage key: merge its committed items, gate the result, write the status."""
    stage = get_stage(name)
    if stage.per_encoder and encoder is None:
        raise ValueError(f"stage '{name}' runs per encoder; pass an encoder name")
    stage_keys(ctx, stage, encoder)
    key = stage_key(name, encoder)
    fp = fingerprint(ctx, stage, encoder)
    if _finished(ctx, stage, encoder, fp):
        log.info("%s: finished earlier with the same inputs; skipped", key)
        return {**(load_status(ctx.layout, key) or {}), "skipped": True}
    try:
        return _finish(ctx, stage, encoder, key, fp)
    finally:
        # Also on failure: stats.json must never keep saying a withdrawn run is complete.
        write_run_stats(ctx)


def _finish(ctx: RunContext, stage: Stage, encoder: str | None, key: str, fp: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    clear_status(ctx.layout, key)
    _sweep(ctx, stage, encoder)
    plan = stage.work(ctx.layout, encoder).plan() or {}
    item_seconds = sum(s.get("item_seconds", 0.0) for s in _committed(stage, ctx.layout, encoder))
    stats = stage.finalize(ctx, encoder)
    if stage.gate and ctx.cfg.validation.enabled:
        from megapairs_ops.quality.gates import validate_stage

        try:
            result = validate_stage(stage.gate, ctx.cfg, ctx.layout, encoder=encoder)
        except Exception:
            stage.gate_failed(ctx, encoder)
            raise
        keep = ("suite", "success", "evaluated", "warnings", "gates")
        stats["validation"] = {k: result[k] for k in keep if k in result}
    stats = stage.accepted(ctx, encoder, stats)
    rows_in, rows_out = stage.rows
    stats.setdefault("rows_in", stats.get(rows_in))
    stats.setdefault("rows_out", stats.get(rows_out))
    stats["execution"] = plan.get("execution")
    record = mark_finished(ctx.layout, key, fp, stats, item_seconds + time.perf_counter() - t0)
    stage.after_finish(ctx, encoder)
    log.info("%s: done in %.1fs (%s in, %s out)", key, record["seconds"], record["rows_in"], record["rows_out"])
    return record


def _committed(stage: Stage, layout: RunLayout, encoder: str | None) -> list[dict[str, Any]]:
    work = stage.work(layout, encoder)
    plan = work.plan() or {}
    return [s for s in (work.stats(i) for i in plan.get("items", [])) if s]


def _sweep(ctx: RunContext, stage: Stage, encoder: str | None) -> None:
    """What interrupted writes left in the stage's own outputs, and DuckDB spill files of a
    killed process: no other writer of them is alive when the stage finalizes."""
    key = stage_key(stage.name, encoder)
    removed = sum(sweep_temps(path) for path in stage.outputs(ctx.layout, encoder))
    spill = ctx.layout.spill_dir(key)
    if spill.is_dir() and any(spill.iterdir()):
        clear_dir(spill)
        removed += 1
    if removed:
        log.info("%s: removed %d temp file(s) or folder(s) an interrupted run left", key, removed)


def run_work_inline(stage: Stage, cfg: Any, layout: RunLayout, encoders: list[str | None] | None = None,
                    corpus: Path | None = None, run_id: str = "") -> list[dict[str, Any]]:
    """A stage's plan, items and finalize in this process, without fingerprints, statuses or
    gates: the stage functions as a library (tests, notebooks, benchmarks). Returns each
    encoder's finalize stats; the work dirs are removed afterwards, as after a finished stage."""
    ctx = RunContext(cfg, corpus or Path("."), layout, run_id or layout.root.name)
    encoders = encoders if encoders is not None else [None]
    items = stage.plan(ctx, encoders)
    todo = [item for item in items if not stage.is_done(ctx, item)]
    if todo:
        stage.run_items(ctx, todo, lambda item, stats: stage.commit(ctx, item, stats))
    results = [stage.finalize(ctx, enc) for enc in encoders]
    for enc in encoders:
        stage.after_finish(ctx, enc)
    return results


# ---------------------------------------------------------------------------------------------
# In one process: the CLI


def run_stage(ctx: RunContext, name: str, encoder: str | None = None, force: bool = False,
              workers: int = 1) -> dict[str, Any]:
    """Plan, run every work item (in up to `workers` processes where the stage's items allow),
    finalize every key. Returns the key's record, or {key: record} for several encoders."""
    from .executor import run_items

    stage = get_stage(name)
    keys = stage_keys(ctx, stage, encoder)
    items = plan_stage(ctx, name, encoder=encoder, force=force)
    if items:
        run_items(ctx, stage, items, workers)
    records = {stage_key(name, enc): finalize_stage(ctx, name, enc) for enc in keys}
    return next(iter(records.values())) if len(records) == 1 else records


def planned_stages(cfg: Any, until: str | None = None) -> list[str]:
    names = stage_names()
    if until is not None and until not in names:
        raise ValueError(f"--until must be one of {', '.join(names)}, got '{until}'")
    return list(names[: names.index(until) + 1]) if until else list(names)


def run_pipeline(ctx: RunContext, until: str | None = None, force: bool = False, workers: int = 1) -> dict:
    try:
        for name in planned_stages(ctx.cfg, until):
            run_stage(ctx, name, force=force, workers=workers)
    finally:
        if until in (None, "publish"):
            # A run that failed a gate gets a report too: it says which gate and why.
            build_run_report(ctx)
    return write_run_stats(ctx)


def check_before_run(ctx: RunContext, until: str | None = None, stages: Iterable[str] | None = None,
                     probe_endpoints: bool = True, local_files: bool = True) -> None:
    """Environment and endpoint checks of the stages about to run (preflight.py): a ConfigError
    naming the key, before anything is written to the run directory."""
    from megapairs_ops.preflight import preflight, raise_on_fatal

    names = set(stages) if stages is not None else set(planned_stages(ctx.cfg, until))
    findings = preflight(ctx.cfg, names, probe_endpoints=probe_endpoints, local_files=local_files)
    raise_on_fatal(findings, ctx.config_source)


# ---------------------------------------------------------------------------------------------
# The run's stats and report


def build_run_report(ctx: RunContext) -> dict | None:
    """The curator report is cheap and always rebuilt; a failure to build it never hides the
    outcome of the run itself."""
    from megapairs_ops.report import build_report

    if not ctx.layout.images.is_file():
        return None
    try:
        return build_report(ctx.cfg, ctx.layout)
    except Exception:
        log.exception("curator report could not be built for %s", ctx.layout.root)
        return None


def write_run_stats(ctx: RunContext) -> dict:
    stages: dict[str, Any] = {}
    for stage in all_stages():
        for enc in stage_keys(ctx, stage):
            status = load_status(ctx.layout, stage_key(stage.name, enc))
            if status:
                stages[stage_key(stage.name, enc)] = status
    publish = stages.get("publish", {})
    stats = {
        "run_id": ctx.run_id,
        "corpus": str(ctx.corpus),
        "stages": stages,
        "seconds_total": round(sum(s.get("seconds", 0.0) for s in stages.values()), 3),
        "images_in": stages.get("ingest", {}).get("items_seen"),
        "images_usable": stages.get("ingest", {}).get("images"),
        "pairs_dropped_by_reason": stages.get("pairs", {}).get("dropped_by_reason"),
        "quarantined": publish.get("quarantined"),
        "failed": publish.get("failed"),
        "triplets": publish.get("triplets"),
        "complete": "publish" in stages,
    }
    write_json(stats, ctx.layout.stats, sort_keys=False)  # stages stay in pipeline order
    return stats


def output_locations(layout: RunLayout) -> dict[str, Path]:
    return {
        "triplets": layout.triplets_dir,
        "triplets_jsonl": layout.triplets_jsonl,
        "quarantine": layout.quarantine,
        "failures": layout.failures,
        "stats": layout.stats,
        "report": layout.report_index,
        "data_docs": layout.data_docs_dir / "index.html",
    }
