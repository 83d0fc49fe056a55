"""The stage graph and its runner, shared by the `megapairs` CLI and the Airflow DAG.

A stage is finished when its status record carries the fingerprint of its config and of its
upstream stages' fingerprints; re-running a finished stage is a no-op, and changing a config
section re-runs exactly the stages downstream of it. Each stage's quality gate (Great
Expectations) runs before the status is written, so a stage whose output fails its gate is not
finished and the next stage refuses to start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from megapairs_ops.config import PipelineConfig, load_config
from megapairs_ops.storage import (
    STAGE_CODE_VERSION,
    RunLayout,
    clear_dir,
    clear_status,
    is_finished,
    load_status,
    mark_finished,
    sweep_temps,
    write_json,
)

log = logging.getLogger("megapairs")

STAGES = ("ingest", "embed", "mine", "pairs", "annotate", "publish")
PER_ENCODER = {"embed", "mine"}


class StageNotReady(RuntimeError):
    """An upstream stage has not finished (or finished with other settings)."""


@dataclass
class RunContext:
    cfg: PipelineConfig
    corpus: Path
    layout: RunLayout
    run_id: str
    progress: bool = False
    config_source: str = "<config>"  # the config file, named in error lines
    _corpus_sig: str | None = field(default=None, repr=False)

    def corpus_signature(self) -> str:
        if self._corpus_sig is None:
            self._corpus_sig = corpus_signature(self.corpus)
        return self._corpus_sig


def context_from_params(
    config: str | os.PathLike,
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    run_id: str | None = None,
    progress: bool = False,
) -> RunContext:
    cfg = load_config(config)
    layout = RunLayout(Path(out))
    return RunContext(
        cfg=cfg,
        corpus=Path(corpus).expanduser().resolve(),
        layout=layout,
        run_id=run_id or layout.root.name,
        progress=progress,
        config_source=str(config),
    )


def check_before_run(ctx: RunContext, until: str | None = None, stages: Iterable[str] | None = None) -> None:
    """Environment and endpoint checks of the stages about to run (preflight.py): a ConfigError
    naming the key, before anything is written to the run directory."""
    from megapairs_ops.preflight import preflight, raise_on_fatal

    names = set(stages) if stages is not None else {stage for stage, _ in planned_stages(ctx.cfg, until)}
    raise_on_fatal(preflight(ctx.cfg, names), ctx.config_source)


def corpus_signature(path: Path) -> str:
    """Cheap change detector for the corpus: names, sizes and mtimes, not contents."""
    h = hashlib.sha256(str(path).encode())
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root, name)
                try:
                    st = full.stat()
                except OSError:
                    continue
                h.update(f"{full.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def stage_key(stage: str, encoder: str | None = None) -> str:
    return f"{stage}-{encoder}" if encoder else stage


def _upstream(ctx: RunContext, stage: str, encoder: str | None) -> list[str]:
    names = [e.name for e in ctx.cfg.encoders]
    return {
        "ingest": [],
        "embed": ["ingest"],
        "mine": [stage_key("embed", encoder)],
        "pairs": [stage_key("mine", n) for n in names] + ["ingest"],
        "annotate": ["pairs"],
        "publish": ["annotate"],
    }[stage]


def _config_parts(ctx: RunContext, stage: str, encoder: str | None) -> list[Any]:
    cfg = ctx.cfg
    if stage == "ingest":
        return [cfg.ingest, str(ctx.corpus), ctx.corpus_signature()]
    if stage == "embed":
        return [cfg.encoder(encoder).model_dump(exclude={"band"}), cfg.ingest.max_pixels]
    if stage == "mine":
        return [cfg.mining, cfg.encoder(encoder).band]
    if stage == "pairs":
        return [cfg.pairs, cfg.mining.n_hard_negatives, cfg.seed]
    if stage == "annotate":
        return [cfg.annotate, cfg.seed]
    if stage == "publish":
        from megapairs_ops.stages.publish.curation import rejects_fingerprint

        # Editing the curators' rejects file or a gate threshold re-publishes.
        return [cfg.publish, cfg.validation, cfg.gates, rejects_fingerprint(cfg)]
    raise ValueError(f"unknown stage '{stage}'; stages are {', '.join(STAGES)}")


def fingerprint(ctx: RunContext, stage: str, encoder: str | None = None) -> str:
    upstream = []
    for key in _upstream(ctx, stage, encoder):
        status = load_status(ctx.layout, key)
        if not status or status.get("state") != "done":
            raise StageNotReady(
                f"stage '{stage_key(stage, encoder)}' needs '{key}' to finish first in {ctx.layout.root}"
            )
        # A stage that ran again with the same inputs may have a new result (annotate retrying
        # failures): its `output_version` makes what follows run again too.
        upstream.append([status["fingerprint"], status.get("output_version")])
    return ctx.cfg.section_fingerprint(
        stage, STAGE_CODE_VERSION, *_config_parts(ctx, stage, encoder), upstream
    )


def _stage_function(stage: str) -> Callable[[RunContext, str | None], dict]:
    # Imported lazily: each stage module pulls in its own heavy dependencies.
    if stage == "ingest":
        from megapairs_ops.stages.ingest.core import ingest_corpus

        return lambda ctx, enc: ingest_corpus(ctx.cfg, ctx.corpus, ctx.layout, progress=ctx.progress)
    if stage == "embed":
        from megapairs_ops.stages.embed.work import embed_corpus

        return lambda ctx, enc: embed_corpus(ctx.cfg, enc, ctx.layout, progress=ctx.progress)
    if stage == "mine":
        from megapairs_ops.stages.mine.work import mine_candidates

        return lambda ctx, enc: mine_candidates(ctx.cfg, enc, ctx.layout)
    if stage == "pairs":
        from megapairs_ops.stages.pairs import build_pairs

        return lambda ctx, enc: build_pairs(ctx.cfg, ctx.layout)
    if stage == "annotate":
        from megapairs_ops.stages.publish.catalogue import annotate_with_reuse

        return lambda ctx, enc: annotate_with_reuse(ctx.cfg, ctx.layout, ctx.run_id, progress=ctx.progress)
    if stage == "publish":
        from megapairs_ops.stages.publish.triplets import publish_triplets

        return lambda ctx, enc: publish_triplets(ctx.cfg, ctx.layout, ctx.run_id)
    raise ValueError(f"unknown stage '{stage}'; stages are {', '.join(STAGES)}")


# Which Great Expectations suite gates which stage's output.
GATES = {"ingest": "ingest", "mine": "mining", "pairs": "pairs", "publish": "triplets"}

# (rows in, rows out) keys of each stage's stats, for the funnel in stats.json.
ROW_KEYS = {
    "ingest": ("items_seen", "images"),
    "embed": ("images_in", "embedded"),
    "mine": ("queries", "candidates"),
    "pairs": ("candidate_rows", "pairs"),
    "annotate": ("pairs_in", "accepted"),
    "publish": ("annotated", "triplets"),
}


# Finished stages whose record says a re-run has work left: annotation failures that a new try
# may fix, under annotate.max_attempts_across_runs.
_WORK_LEFT = {"annotate": lambda status: bool(status.get("retryable_failures"))}


def _finished(ctx: RunContext, stage: str, key: str, fp: str) -> bool:
    if not is_finished(ctx.layout, key, fp):
        return False
    work_left = _WORK_LEFT.get(stage)
    return not (work_left and work_left(load_status(ctx.layout, key) or {}))


def stage_outputs(ctx: RunContext, stage: str, encoder: str | None = None) -> list[Path]:
    """Every file and folder only this stage writes (within the run directory). When the stage
    starts, no other writer of them is alive (Airflow runs it after its mapped items), so what
    interrupted writes left there is swept then."""
    lay = ctx.layout
    if stage == "ingest":
        return [lay.images.parent, lay.quarantine_part("ingest")]
    if stage == "embed":
        return [lay.embedding_dir(encoder), lay.root / "embeddings" / "_plan", lay.quarantine_part(f"embed-{encoder}")]
    if stage == "mine":
        return [lay.root / "mining" / encoder, lay.candidates(encoder), lay.neighbours(encoder),
                lay.neighbours(encoder).with_suffix(".json")]
    if stage == "pairs":
        return [lay.pairs, lay.failures_part("pairs"), lay.spill_dir("pairs")]
    if stage == "annotate":
        return [lay.root / "annotations", lay.annotations, lay.failures_part("annotate")]
    if stage == "publish":
        from megapairs_ops.stages.publish.triplets import run_config_path

        return [lay.triplets_dir, lay.triplets_jsonl, lay.root / "triplets.rejected", lay.quarantine, lay.failures,
                lay.failures_part("curation"), lay.root / "manifest.json", run_config_path(lay), lay.spill_dir("publish")]
    raise ValueError(f"unknown stage '{stage}'; stages are {', '.join(STAGES)}")


def _sweep(ctx: RunContext, stage: str, encoder: str | None) -> None:
    removed = sum(sweep_temps(path) for path in stage_outputs(ctx, stage, encoder))
    spill = ctx.layout.spill_dir(stage)
    if spill.is_dir() and any(spill.iterdir()):
        clear_dir(spill)  # spill files of a killed DuckDB
        removed += 1
    if removed:
        log.info("%s: removed %d temp file(s) or folder(s) an interrupted run left", stage_key(stage, encoder), removed)


def stage_finished(ctx: RunContext, stage: str, encoder: str | None = None) -> bool:
    """Whether run_stage would skip the stage: it finished earlier with the same inputs and left
    nothing a re-run could still do."""
    return _finished(ctx, stage, stage_key(stage, encoder), fingerprint(ctx, stage, encoder))


# Work items for an orchestrator that maps a stage's work over tasks (the Airflow DAG): plan, run
# every item (idempotent, so a retried task resumes), then run_stage finds the items done and
# finalizes and gates as it does for the CLI. Stages already finished plan no work.


def plan_embed_stage(ctx: RunContext, device: str | None = None) -> list[dict]:
    """Embed work items (embed.plan_embed_work) of the encoders whose embed stage is not finished;
    with `device` ('gpu' or 'cpu') only the items for that device, so each can be routed to its
    own queue and pool. Run them with embed.run_embed_work, then run_stage('embed', encoder)."""
    if device not in (None, "gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    names = [e.name for e in ctx.cfg.encoders if not stage_finished(ctx, "embed", e.name)]
    if not names:
        return []
    from megapairs_ops.stages.embed.work import plan_embed_work

    items = plan_embed_work(ctx.cfg, ctx.layout, names)
    return [item for item in items if device is None or item["device"] == device]


def plan_mine_stage(ctx: RunContext, encoders: Iterable[str]) -> list[dict]:
    """Mining work items (mine.plan_mining_work: query ranges) of the named encoders whose mine
    stage is not finished. Run them with mine.run_mining_work, then run_stage('mine', encoder)."""
    from megapairs_ops.stages.mine.work import plan_mining_work

    return [
        item
        for name in encoders
        if not stage_finished(ctx, "mine", name)
        for item in plan_mining_work(ctx.cfg, ctx.layout, name)
    ]


def plan_annotate_stage(ctx: RunContext) -> list[dict]:
    """Annotate work items after the catalogue reuse split (catalogue.plan_annotate_with_reuse),
    none when the stage is finished. Run them with catalogue.run_annotate_item, then
    run_stage('annotate') merges and finalizes without asking a model again."""
    if stage_finished(ctx, "annotate"):
        return []
    from megapairs_ops.stages.publish.catalogue import plan_annotate_with_reuse

    return plan_annotate_with_reuse(ctx.cfg, ctx.layout)


def run_stage(ctx: RunContext, stage: str, encoder: str | None = None, force: bool = False) -> dict:
    if stage in PER_ENCODER and encoder is None:
        raise ValueError(f"stage '{stage}' runs per encoder; pass an encoder name")
    if stage not in PER_ENCODER and encoder is not None:
        raise ValueError(f"stage '{stage}' does not take an encoder")
    if encoder is not None:
        ctx.cfg.encoder(encoder)
    key = stage_key(stage, encoder)
    fp = fingerprint(ctx, stage, encoder)
    if not force and _finished(ctx, stage, key, fp):
        log.info("%s: finished earlier with the same inputs; skipped", key)
        record = dict(load_status(ctx.layout, key) or {})
        record["skipped"] = True
        return record

    clear_status(ctx.layout, key)
    try:
        return _execute(ctx, stage, encoder, key, fp)
    finally:
        # Also on failure: stats.json must never keep saying a withdrawn run is complete.
        write_run_stats(ctx)


def _execute(ctx: RunContext, stage: str, encoder: str | None, key: str, fp: str) -> dict:
    fn = _stage_function(stage)
    log.info("%s: started", key)
    _sweep(ctx, stage, encoder)
    t0 = time.perf_counter()
    stats = fn(ctx, encoder)
    if stage == "publish":
        annotate_status = load_status(ctx.layout, "annotate") or {}
        stats.setdefault("annotated", annotate_status.get("accepted", 0))
    gate = GATES.get(stage)
    if gate and ctx.cfg.validation.enabled:
        from megapairs_ops.quality.gates import validate_stage

        try:
            result = validate_stage(gate, ctx.cfg, ctx.layout, encoder=encoder)
        except Exception:
            if stage == "publish":
                _withdraw_triplets(ctx.layout)
            raise
        keep = ("suite", "success", "evaluated", "warnings", "gates")
        stats["validation"] = {k: result[k] for k in keep if k in result}
    if stage == "publish":
        from megapairs_ops.stages.publish.catalogue import record_version

        # Only a publication that passed its gate becomes a dataset version.
        manifest = record_version(ctx.cfg, ctx.layout, ctx.run_id)
        stats["version"] = {k: manifest[k] for k in ("version", "parent", "added", "carried_over")}
    rows_in, rows_out = ROW_KEYS[stage]
    stats.setdefault("rows_in", stats.get(rows_in))
    stats.setdefault("rows_out", stats.get(rows_out))
    record = mark_finished(ctx.layout, key, fp, stats, time.perf_counter() - t0)
    log.info("%s: done in %.1fs (%s in, %s out)", key, record["seconds"], record["rows_in"], record["rows_out"])
    return record


def _withdraw_triplets(layout: RunLayout) -> None:
    """A triplet set that failed its gate must not look published."""
    import shutil

    rejected = layout.root / "triplets.rejected"
    shutil.rmtree(rejected, ignore_errors=True)
    if layout.triplets_dir.exists():
        os.replace(layout.triplets_dir, rejected)
    layout.triplets_jsonl.unlink(missing_ok=True)


def planned_stages(cfg: PipelineConfig, until: str | None = None) -> list[tuple[str, str | None]]:
    if until is not None and until not in STAGES:
        raise ValueError(f"--until must be one of {', '.join(STAGES)}, got '{until}'")
    plan: list[tuple[str, str | None]] = []
    for stage in STAGES:
        if stage in PER_ENCODER:
            plan += [(stage, e.name) for e in cfg.encoders]
        else:
            plan.append((stage, None))
        if stage == until:
            break
    return plan


def run_pipeline(ctx: RunContext, until: str | None = None, force: bool = False) -> dict:
    try:
        for stage, encoder in planned_stages(ctx.cfg, until):
            run_stage(ctx, stage, encoder, force=force)
    finally:
        if until in (None, "publish"):
            # A run that failed a gate gets a report too: it says which gate and why.
            build_run_report(ctx)
    return write_run_stats(ctx)


def build_run_report(ctx: RunContext) -> dict | None:
    """The curator report is cheap and always rebuilt; a failure to build it never hides the
    outcome of the run itself."""
    from megapairs_ops.report.build import build_report

    if not ctx.layout.images.is_file():
        return None
    try:
        return build_report(ctx.cfg, ctx.layout)
    except Exception:
        log.exception("curator report could not be built for %s", ctx.layout.root)
        return None


def write_run_stats(ctx: RunContext) -> dict:
    stages: dict[str, Any] = {}
    for stage, encoder in planned_stages(ctx.cfg):
        status = load_status(ctx.layout, stage_key(stage, encoder))
        if status:
            stages[stage_key(stage, encoder)] = status
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
        "report": layout.reports_dir / "index.html",
        "data_docs": layout.data_docs_dir / "index.html",
    }
