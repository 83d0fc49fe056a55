"""The report's figures, read from a run's artifacts with DuckDB (sql/report_*.sql): the funnel,
similarity histograms, encoder overlap, instruction statistics, problems by reason, and the
previous run's headline figures (its reports/summary.json) to compare with."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq

from megapairs_ops.config import PipelineConfig
from megapairs_ops.db import open_session, sql
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import load_status, read_json

log = logging.getLogger(__name__)


SIM_BIN = 0.01


def _rows(path: Path) -> int | None:
    return pq.read_metadata(path).num_rows if Path(path).is_file() else None


def _parts(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.parquet")) if Path(folder).is_dir() else []


def triplet_source(layout: RunLayout) -> tuple[list[Path], str]:
    """The triplet parts the report describes and what they are: `published`, `withdrawn` (a
    failed gate moved them to triplets.rejected/) or `none`."""
    parts = sorted(layout.triplets_dir.glob("part-*.parquet"))
    if parts:
        return parts, "published"
    withdrawn = sorted(layout.triplets_rejected.glob("part-*.parquet"))
    return (withdrawn, "withdrawn") if withdrawn else ([], "none")


def run_encoders(layout: RunLayout) -> list[str]:
    """Encoder names of a run, read off its artifacts (for runs whose config is not at hand)."""
    names = {p.stem for p in _parts(layout.candidates_dir)}
    names |= {p.name.removeprefix("embed-").removesuffix(".json") for p in layout.status_dir.glob("embed-*.json")}
    return sorted(names)


def load_run_config(layout: RunLayout):
    """The config a run recorded at publish (or at its last report build)."""
    from megapairs_ops.config import ConfigError, parse_config
    from megapairs_ops.stages.publish.triplets import run_config_path

    path = run_config_path(layout)
    if not path.is_file():
        raise ConfigError(f"{path}: no recorded config (the run has not published); pass --config")
    return parse_config(read_json(path), str(path))


def find_previous_run(cfg: PipelineConfig, layout: RunLayout) -> RunLayout | None:
    """The run `curation.compare_with` names: null (none), a run directory, or "auto": the parent
    dataset version named in this run's manifest.json when its partition sits beside this one,
    else among the other run directories beside this one (the same output root) the one whose
    publish finished last before this run's (or last at all, when this run has not published)."""
    target = cfg.curation.compare_with
    if target is None:
        return None
    if target != "auto":
        path = Path(target).expanduser().resolve()
        return RunLayout(path) if path != layout.root and path.is_dir() else None
    manifest = layout.manifest
    parent = read_json(manifest).get("parent") if manifest.is_file() else None
    if parent and (layout.output_root / parent).is_dir() and parent != layout.version:
        return RunLayout(layout.output_root / parent)
    mine = (load_status(layout, "publish") or {}).get("finished_at") or "9999"
    best: tuple[str, Path] | None = None
    parent = layout.root.parent
    for other in sorted(p for p in parent.iterdir() if p.is_dir() and p != layout.root):
        status = load_status(RunLayout(other), "publish") or {}
        finished = status.get("finished_at")
        if status.get("state") == "done" and finished and finished <= mine and (best is None or finished > best[0]):
            best = (finished, other)
    return RunLayout(best[1]) if best else None


class ReportDb:
    """One DuckDB connection for the report's aggregations (they stream over Parquet)."""

    def __init__(self, settings: dict[str, Any] | None):
        self.con = open_session(settings)

    def rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        cur = self.con.execute(sql(name), params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def close(self) -> None:
        self.con.close()


def read_problems(db: ReportDb, folder: Path) -> list[dict[str, Any]]:
    parts = [str(p) for p in _parts(folder) if _rows(p)]
    return db.rows("report_problem_counts", {"paths": parts}) if parts else []


def read_similarity(db: ReportDb, layout: RunLayout, encoder: str) -> dict[str, Any] | None:
    """Histograms (bins of SIM_BIN) of every retrieved neighbour and of the in-band candidates."""
    counts: dict[str, dict[int, int]] = {}
    for kind, path in (("neighbours", layout.neighbours(encoder)), ("candidates", layout.candidates(encoder))):
        if path.is_file() and _rows(path):
            counts[kind] = {int(r["bin"]): int(r["n"]) for r in
                            db.rows("report_similarity_histogram", {"path": str(path), "width": SIM_BIN})}
    if not counts:
        return None
    bins = sorted(set().union(*counts.values()))
    return {"bins": bins, **{k: counts.get(k, {}) for k in ("neighbours", "candidates")},
            "neighbours_total": sum(counts.get("neighbours", {}).values()),
            "candidates_total": sum(counts.get("candidates", {}).values())}


def read_combinations(db: ReportDb, paths: Sequence[Path]) -> list[dict[str, Any]]:
    files = [str(p) for p in paths if _rows(p)]
    return db.rows("report_encoder_combinations", {"paths": files}) if files else []


def read_instructions(layout: RunLayout, parts: list[Path], settings: dict[str, Any] | None) -> dict[str, Any] | None:
    from megapairs_ops.quality.instruction_stats import instruction_stats

    if parts:
        return instruction_stats(parts, "q_text", top=12, settings=settings)
    if layout.annotations.is_file():
        return instruction_stats([layout.annotations], "instructions", top=12, settings=settings)
    return None


def collect_figures(layout: RunLayout, encoders: Sequence[str] | None = None,
                    settings: dict[str, Any] | None = None, _db: ReportDb | None = None,
                    _instr: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's headline figures (what `summary.json` keeps and comparisons read); needs only
    the run directory."""
    from megapairs_ops.quality.gates import load_gate_results

    encoders = list(encoders) if encoders is not None else run_encoders(layout)
    db = _db or ReportDb(settings)
    try:
        ingest = load_status(layout, "ingest") or {}
        pairs_status = load_status(layout, "pairs") or {}
        parts, state = triplet_source(layout)
        quarantine = read_problems(db, layout.quarantine_dir)
        failures = read_problems(db, layout.failures_dir)
        instr = _instr if _instr is not None else read_instructions(layout, parts, settings)
        views = {}
        for row in read_combinations(db, [layout.pairs]):
            views[str(row["views"])] = views.get(str(row["views"]), 0) + int(row["pairs"])
    finally:
        if _db is None:
            db.close()
    items = ingest.get("items_seen")
    quarantined = sum(int(r["n"]) for r in quarantine)
    annotate_failed = sum(int(r["n"]) for r in failures if r["stage"] == "annotate")
    annotated = _rows(layout.annotations)
    excluded = sum(int(r["n"]) for r in failures if r["stage"] == "curation")
    gates = {"pass": 0, "warn": 0, "fail": 0, "skipped": 0, "off": 0}
    for suite in load_gate_results(layout):
        for g in suite.get("gates", []):
            gates[g["status"]] = gates.get(g["status"], 0) + 1
        # a failed schema rule is a failed gate too
        gates["fail"] += len([f for f in suite.get("failed_expectations", [])
                              if f not in {g["gate"] for g in suite.get("gates", [])}])
    attempted = (annotated or 0) + annotate_failed
    return {
        "run_id": (load_status(layout, "publish") or {}).get("run_id") or layout.root.name,
        "run_dir": str(layout.root),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "state": state,
        "images_in": items,
        "images_usable": _rows(layout.images),
        "quarantined": quarantined,
        "quarantine_rate": quarantined / items if items else None,
        "duplicates_collapsed": ingest.get("duplicates_collapsed"),
        "embedded": {e: _rows(layout.embedding_ids(e)) for e in encoders},
        "candidates": {e: _rows(layout.candidates(e)) for e in encoders},
        "mining": {e: _mining_mode(load_status(layout, f"mine-{e}")) for e in encoders},
        "union_pairs": pairs_status.get("union_pairs"),
        "pairs": _rows(layout.pairs),
        "pairs_by_views": views,
        "annotated": annotated,
        "annotate_failed": annotate_failed,
        "failure_rate": annotate_failed / attempted if attempted else None,
        "excluded_by_curators": excluded,
        "published": sum(_rows(p) or 0 for p in parts) if state == "published" else 0,
        "instructions": None if instr is None else {
            k: instr[k] for k in ("instructions", "mean_per_pair", "vocabulary", "distinct_1", "distinct_2",
                                  "instruction_share", "opening_share", "distinct_instructions")
        } | {"mean_words": instr["words"]["mean"]},
        "gates": gates,
    }


def _mining_mode(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """Full or incremental mining of one encoder (docs/mining.md), from its stage's stats."""
    if not status or "mode" not in status:
        return None
    inc = status.get("incremental") or {}
    return {"mode": status["mode"], "reason": status.get("mode_reason"), "parent": inc.get("parent"),
            "queries": status.get("queries"), "queries_from_parent": inc.get("queries_from_parent")}


def previous_figures(previous: RunLayout | None, settings: dict[str, Any] | None) -> dict[str, Any] | None:
    if previous is None:
        return None
    try:
        if previous.report_summary.is_file():
            return read_json(previous.report_summary)
        return collect_figures(previous, settings=settings)
    except Exception as exc:  # an unreadable old run must not stop this run's report
        log.warning("previous run %s unreadable for comparison: %s", previous.root, exc)
        return {"run_dir": str(previous.root), "error": str(exc)}
