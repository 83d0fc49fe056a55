"""Annotate's plan and finalize, and the stage as a library call.

The plan splits the pairs into those the catalogue already answers (reuse.py) and those to ask
about, and cuts the latter by pair-id prefix (the first two hex digits) into work items of about
`annotate.pairs_per_task` pairs. An item (item.py) writes its accepted annotations and failures
as parts; finalize merges every item's parts with the reused annotations into annotations.parquet
and the stage's failures part.

Records live in a namespace of everything that shapes the question (run seed, WORD_NUM range,
number of demos, prompt files), so changing those asks anew while changing endpoints or
sampling settings reuses what was accepted. A re-run of a finished run asks again about the
failures with tries left under `max_attempts_across_runs` (the stage's `work_left`).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megapairs_ops.config import PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import ANNOTATION_OUTPUT_SCHEMA, FAILURE_SCHEMA
from megapairs_ops.stages.annotate.backends import Backend
from megapairs_ops.stages.annotate.item import ItemBackends, annotate_item, item_parts, pair_prefixes
from megapairs_ops.stages.annotate.outcomes import RECORD_FORMAT, STAGE, Answers
from megapairs_ops.stages.annotate.records import shard_name
from megapairs_ops.stages.annotate.request_stats import RequestStats
from megapairs_ops.stages.annotate.reuse import REUSED_FILE, split_for_reuse
from megapairs_ops.stages.annotate.types import STEPS
from megapairs_ops.storage import WorkDir, atomic_path, file_stamps

log = logging.getLogger("megapairs_ops.stages.annotate")


def annotate_work(layout: RunLayout) -> WorkDir:
    return WorkDir(layout.work_dir(STAGE))


def _prefix_counts(pairs_path: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for batch in pq.ParquetFile(pairs_path).iter_batches(columns=["pair_id"], batch_size=1 << 16):
        for entry in pc.value_counts(pair_prefixes(batch.column(0))).to_pylist():
            if entry["values"] is not None:
                counts[entry["values"]] += entry["counts"]
    return dict(counts)


def _items(pairs_path: Path, pairs_per_task: int) -> list[dict[str, Any]]:
    """Contiguous pair-id prefix ranges of about `pairs_per_task` pairs each (at most 256 items:
    one per prefix). Small JSON-able dicts."""
    counts = _prefix_counts(pairs_path)
    items: list[dict[str, Any]] = []
    group: list[str] = []
    n = 0
    for prefix in sorted(counts):
        group.append(prefix)
        n += counts[prefix]
        if n >= pairs_per_task:
            items.append(_item(len(items), group, n))
            group, n = [], 0
    if group:
        items.append(_item(len(items), group, n))
    return items


def _item(index: int, prefixes: list[str], pairs: int) -> dict[str, Any]:
    first, last = prefixes[0], prefixes[-1]
    return {"id": f"{shard_name(first)}-{shard_name(last)}", "index": index, "first": first, "last": last,
            "pairs": pairs}


def plan_annotate_work(cfg: PipelineConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """The work items of this execution: the reuse split is made once, when the execution starts,
    and holds until it finishes, even if another run publishes in between."""
    fingerprint = cfg.section_fingerprint("annotate-work", RECORD_FORMAT, cfg.annotate, cfg.seed,
                                          file_stamps(layout.pairs, layout.images))
    work = annotate_work(layout)
    plan = work.matches(fingerprint)
    if plan is None:
        def split(root: Path) -> dict[str, Any]:
            decided = split_for_reuse(cfg, layout, root)
            specs = _items(Path(decided["pairs"]), cfg.annotate.pairs_per_task)
            return {**decided, "specs": specs, "items": [s["id"] for s in specs]}

        plan = work.start(fingerprint, artifacts=split)
    return plan["specs"]


def finalize_annotate(cfg: PipelineConfig, layout: RunLayout, run_id: str = "") -> dict[str, Any]:
    """Merge every item's parts and the reused annotations into annotations.parquet (pair_id
    order) and the stage's failures part; ItemsNotDone while an item is missing. Returns the
    stage's stats."""
    work = annotate_work(layout)
    plan = work.plan() or {}
    items = work.require_all()
    ctx = Answers(cfg, layout, plan.get("execution", ""))
    fresh = [pq.read_table(item_parts(work, s["item"])[0], schema=ANNOTATION_OUTPUT_SCHEMA) for s in items]
    reused_path = work.root / REUSED_FILE
    if plan.get("reused"):
        reused = pq.read_table(reused_path)
        fresh.append(pa.Table.from_pylist(reused.to_pylist(), schema=ANNOTATION_OUTPUT_SCHEMA))
    accepted = pa.concat_tables(fresh) if fresh else ANNOTATION_OUTPUT_SCHEMA.empty_table()
    with atomic_path(layout.annotations) as tmp:
        pq.write_table(accepted.sort_by("pair_id"), tmp, compression="zstd")
    failures = [pq.read_table(item_parts(work, s["item"])[1], schema=FAILURE_SCHEMA) for s in items]
    failed = pa.concat_tables(failures) if failures else FAILURE_SCHEMA.empty_table()
    with atomic_path(layout.failures_part(STAGE)) as tmp:
        pq.write_table(failed, tmp, compression="zstd")
    reasons = Counter(failed.column("reason").to_pylist())

    steps = {step: RequestStats() for step in STEPS}
    outcomes = {step: Counter() for step in STEPS}
    attempt_failures = {step: Counter() for step in STEPS}
    for data in items:
        for step in STEPS:
            steps[step].merge_dict(data["steps"][step])
            outcomes[step].update({k: data["steps"][step].get(k, 0) for k in ("accepted", "failed", "resampled")})
            attempt_failures[step].update(data["steps"][step].get("attempt_failures", {}))
    step_stats = {
        step: {
            **steps[step].to_dict(histogram=False),
            **{k: outcomes[step][k] for k in ("accepted", "failed", "resampled")},
            "attempt_failures": dict(sorted(attempt_failures[step].items())),
        }
        for step in STEPS
    }
    for step in STEPS:
        log.info("annotate [%s]: %s", step, steps[step].summary())
    acfg = cfg.annotate
    (d_kind, d_model), (i_kind, i_model) = ctx.identity["describe"], ctx.identity["instruct"]
    stats = {
        "pairs_in": plan.get("pairs_in", 0),
        "accepted": accepted.num_rows,
        "failed": failed.num_rows,
        "failures_by_reason": dict(sorted(reasons.items())),
        # Failures the next execution of the stage would ask again (a model's bad answer, under
        # max_attempts_across_runs): a re-run of a finished run retries them.
        "retryable_failures": sum(s.get("retryable_failures", 0) for s in items),
        "reused": plan.get("reused", 0),
        "pairs_annotated": plan.get("pairs_to_annotate", 0),
        # Published annotations that fail today's checks are asked again, never published again.
        "reuse_failed_checks": plan.get("reuse_failed_checks", {}),
        "describe_backend": d_kind,
        "describe_model": d_model,
        "instruct_backend": i_kind,
        "instruct_model": i_model,
        "prompt_version": acfg.prompt_version,
        "work_items": len(items),
        "pairs_requested": sum(s.get("pairs_requested", 0) for s in items),
        "requests": {step: step_stats[step]["requests"] for step in STEPS},
        "steps": step_stats,
        "records": str(ctx.store.root.relative_to(layout.root)),
        "run_id": run_id,
    }
    log.info("annotate: %d pairs, %d accepted, %d failed %s", stats["pairs_in"], stats["accepted"],
             stats["failed"], stats["failures_by_reason"])
    return stats


def run_annotate_work(
    cfg: PipelineConfig, layout: RunLayout, item: dict[str, Any], run_id: str = "", *,
    backends: ItemBackends | tuple[Backend, Backend] | None = None, progress: bool = False,
) -> dict[str, Any]:
    """One work item as a mapped task runs it: annotated and committed, or its committed stats
    when it is done."""
    work = annotate_work(layout)
    stats = work.stats(item["id"])
    if stats is None:
        stats = annotate_item(cfg, layout, work, item, run_id, backends=backends, progress=progress)
        work.commit(item["id"], stats)
    return stats


def annotate_pairs(
    cfg: PipelineConfig, layout: RunLayout, run_id: str, progress: bool = False,
    backends: tuple[Backend, Backend] | None = None,
) -> dict[str, Any]:
    """The whole stage in this process (tests, notebooks): plan, every item, finalize; the work
    dir is removed once finalized. `backends` (describe, instruct) overrides the configured ones."""
    pool = ItemBackends(cfg, layout, backends)
    try:
        for item in plan_annotate_work(cfg, layout):
            run_annotate_work(cfg, layout, item, run_id, backends=pool, progress=progress)
    finally:
        pool.close()
    stats = finalize_annotate(cfg, layout, run_id)
    annotate_work(layout).clear()
    return stats
