"""The curator report: one static page per run (`reports/index.html`, thumbnails in
`reports/thumbs/`), built from the run's artifacts and opened straight from disk: inline CSS,
inline SVG charts, no script, nothing fetched from a network.

Sections: overview, gates (every Great Expectations gate with its figure, threshold and severity),
the funnel from inputs to published triplets with every loss by reason, similarity histograms per
encoder with the band marked, encoder overlap, instruction statistics (the template-collapse
detector), a seeded gallery of triplets stratified by encoder, curation (what curators withheld
and why) and a comparison with the previous run.

A run that did not publish (a gate failed, or it is still running) gets a report too: the sections
whose inputs exist are shown, a withdrawn triplet set (`triplets.rejected/`) stands in for the
release, and the banner says why nothing shipped.

`reports/summary.json` keeps the headline figures, so a later run compares against them without
re-reading this run's artifacts.
"""

from __future__ import annotations

import logging
import time
from html import escape
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq

from megapairs_ops.report import charts
from megapairs_ops.config import PipelineConfig
from megapairs_ops.sqlfiles import sql
from megapairs_ops.storage import RunLayout, atomic_dir, atomic_path, clear_dir, load_status, read_json, sweep_temps, write_json

log = logging.getLogger(__name__)

THUMB_SIDE = 224
SIM_BIN = 0.01
SECTIONS = (
    ("overview", "Overview"), ("gates", "Gates"), ("funnel", "Funnel"), ("similarity", "Similarity"),
    ("overlap", "Encoder overlap"), ("instructions", "Instructions"), ("gallery", "Gallery"),
    ("curation", "Curation"), ("comparison", "Comparison"),
)


# ---------------------------------------------------------------- locations


def report_index(layout: RunLayout) -> Path:
    return layout.reports_dir / "index.html"


def summary_path(layout: RunLayout) -> Path:
    return layout.reports_dir / "summary.json"


def thumbs_dir(layout: RunLayout) -> Path:
    return layout.reports_dir / "thumbs"


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
    withdrawn = sorted((layout.root / "triplets.rejected").glob("part-*.parquet"))
    return (withdrawn, "withdrawn") if withdrawn else ([], "none")


def run_encoders(layout: RunLayout) -> list[str]:
    """Encoder names of a run, read off its artifacts (for runs whose config is not at hand)."""
    names = {p.stem for p in _parts(layout.root / "candidates")}
    names |= {p.name.removeprefix("embed-").removesuffix(".json")
              for p in (layout.root / "_status").glob("embed-*.json")}
    return sorted(names)


def load_run_config(layout: RunLayout):
    """The config a run recorded at publish (or at its last report build)."""
    from megapairs_ops.config import ConfigError, parse_config
    from megapairs_ops.stages.publish.triplets import run_config_path

    path = run_config_path(layout)
    if not path.is_file():
        raise ConfigError(f"{path}: no recorded config (the run has not published); pass --config")
    return parse_config(read_json(path), str(path))


# ---------------------------------------------------------------- previous run


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
    manifest = layout.root / "manifest.json"
    parent = read_json(manifest).get("parent") if manifest.is_file() else None
    if parent and (layout.root.parent / parent).is_dir() and parent != layout.root.name:
        return RunLayout(layout.root.parent / parent)
    mine = (load_status(layout, "publish") or {}).get("finished_at") or "9999"
    best: tuple[str, Path] | None = None
    parent = layout.root.parent
    for other in sorted(p for p in parent.iterdir() if p.is_dir() and p != layout.root):
        status = load_status(RunLayout(other), "publish") or {}
        finished = status.get("finished_at")
        if status.get("state") == "done" and finished and finished <= mine and (best is None or finished > best[0]):
            best = (finished, other)
    return RunLayout(best[1]) if best else None


# ---------------------------------------------------------------- data


class _Db:
    """One DuckDB connection for the report's aggregations (they stream over Parquet)."""

    def __init__(self, layout: RunLayout, memory_limit: str | None):
        import duckdb

        spill = layout.spill_dir("report")
        spill.mkdir(parents=True, exist_ok=True)
        config = {"temp_directory": str(spill)}
        if memory_limit:
            config["memory_limit"] = memory_limit
        self.con = duckdb.connect(config=config)

    def rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        cur = self.con.execute(sql(name), params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def close(self) -> None:
        self.con.close()


def _problems(db: _Db, folder: Path) -> list[dict[str, Any]]:
    parts = [str(p) for p in _parts(folder) if _rows(p)]
    return db.rows("report_problem_counts", {"paths": parts}) if parts else []


def _similarity(db: _Db, layout: RunLayout, encoder: str) -> dict[str, Any] | None:
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


def _combinations(db: _Db, paths: Sequence[Path]) -> list[dict[str, Any]]:
    files = [str(p) for p in paths if _rows(p)]
    return db.rows("report_encoder_combinations", {"paths": files}) if files else []


def _instructions(layout: RunLayout, parts: list[Path], memory_limit: str | None) -> dict[str, Any] | None:
    from megapairs_ops.quality.instruction_stats import instruction_stats

    spill = layout.spill_dir("report")
    if parts:
        return instruction_stats(parts, "q_text", top=12, spill_dir=spill, memory_limit=memory_limit)
    if layout.annotations.is_file():
        return instruction_stats([layout.annotations], "instructions", top=12, spill_dir=spill,
                                 memory_limit=memory_limit)
    return None


def collect_figures(layout: RunLayout, encoders: Sequence[str] | None = None,
                    memory_limit: str | None = None, _db: _Db | None = None,
                    _instr: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's headline figures (what `summary.json` keeps and comparisons read); needs only
    the run directory."""
    from megapairs_ops.quality.gates import load_gate_results

    encoders = list(encoders) if encoders is not None else run_encoders(layout)
    db = _db or _Db(layout, memory_limit)
    try:
        ingest = load_status(layout, "ingest") or {}
        pairs_status = load_status(layout, "pairs") or {}
        parts, state = triplet_source(layout)
        quarantine = _problems(db, layout.root / "quarantine")
        failures = _problems(db, layout.root / "failures")
        instr = _instr if _instr is not None else _instructions(layout, parts, memory_limit)
        views = {}
        for row in _combinations(db, [layout.pairs]):
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


def _previous_figures(previous: RunLayout | None, memory_limit: str | None) -> dict[str, Any] | None:
    if previous is None:
        return None
    try:
        if summary_path(previous).is_file():
            return read_json(summary_path(previous))
        return collect_figures(previous, memory_limit=memory_limit)
    except Exception as exc:  # an unreadable old run must not stop this run's report
        log.warning("previous run %s unreadable for comparison: %s", previous.root, exc)
        return {"run_dir": str(previous.root), "error": str(exc)}


# ---------------------------------------------------------------- gallery


def _gallery(db: _Db, cfg: PipelineConfig, layout: RunLayout, parts: list[Path]) -> list[dict[str, Any]]:
    """A seeded sample of triplets, `curation.gallery_per_encoder` per encoder that found them
    (a pair found by several encoders appears once, under the first)."""
    k = cfg.curation.gallery_per_encoder
    if not parts or not k:
        return []
    picked: list[dict[str, Any]] = []
    for enc in (e.name for e in cfg.encoders):
        rows = db.rows("report_gallery_sample", {
            "paths": [str(p) for p in parts], "encoder": enc, "seed": str(cfg.seed), "k": k,
            "taken": [r["pair_id"] for r in picked]})
        picked += [dict(r, stratum=enc) for r in rows]
    if not picked or not layout.images.is_file():
        return picked
    paths = sorted({p for r in picked for p in [r["q_img"], r["t_img"], *r["hns"]]})
    images = {r["path"]: r for r in db.rows("report_gallery_images", {"images": str(layout.images), "paths": paths})}
    for r in picked:
        r["images"] = images
    return picked


def _make_thumbs(picked: list[dict[str, Any]], layout: RunLayout, max_pixels: int) -> dict[str, tuple[int, int]]:
    """JPEG thumbnails named by image id; returns id -> (width, height) for those that could be
    made (an image that moved or broke since ingest gets a placeholder in the page)."""
    from megapairs_ops.media import load_rgb, read_image_bytes

    wanted: dict[str, str] = {}
    for r in picked:
        for path in [r["q_img"], r["t_img"], *r["hns"][1:]]:
            info = r.get("images", {}).get(path)
            if info:
                wanted[info["image_id"]] = path
    sizes: dict[str, tuple[int, int]] = {}
    with atomic_dir(thumbs_dir(layout)) as tmp:
        for image_id, path in sorted(wanted.items()):
            try:
                img = load_rgb(read_image_bytes(path), max_pixels)
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                img.save(tmp / f"{image_id}.jpg", "JPEG", quality=85)
                sizes[image_id] = img.size
            except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a placeholder
                log.warning("no thumbnail for %s: %s", path, exc)
    return sizes


# ---------------------------------------------------------------- rendering helpers


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


_int = charts.fmt_int


def _enc_colour(cfg_names: Sequence[str], name: str) -> str:
    return charts.PALETTE[cfg_names.index(name) % len(charts.PALETTE)] if name in cfg_names else charts.MUTED


def _table(header: Sequence[str], rows: Iterator[Sequence[str]] | Sequence[Sequence[str]],
           numeric: Sequence[int] = (), cls: str = "") -> str:
    """Cells are HTML already (escape text before)."""
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{h}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kpi(value: str, label: str, note: str = "", tone: str = "") -> str:
    return (f'<div class="kpi {tone}"><div class="kpi-value">{value}</div><div class="kpi-label">{escape(label)}</div>'
            + (f'<div class="kpi-note">{note}</div>' if note else "") + "</div>")


def _section(key: str, title: str, body: str, intro: str = "") -> str:
    return (f'<section id="{key}"><h2>{escape(title)}</h2>'
            + (f'<p class="intro">{intro}</p>' if intro else "") + body + "</section>")


def _missing(what: str) -> str:
    return f'<p class="missing">Not available: {escape(what)}.</p>'


def _badge(status: str) -> str:
    return f'<span class="badge {escape(status)}">{escape(status)}</span>'


# ---------------------------------------------------------------- sections


def _banner(fig: dict[str, Any], suites: list[dict[str, Any]]) -> str:
    failed = [s for s in suites if not s.get("success", True)]
    warn = fig["gates"].get("warn", 0)
    if fig["state"] == "published":
        tone = "warn" if warn else "ok"
        text = f"Published {_int(fig['published'])} triplets" + (f" · {warn} gate warning(s)" if warn else "")
    elif failed:
        tone = "fail"
        text = "Not published: " + "; ".join(
            f"{s['suite']} failed ({', '.join(s.get('failed_expectations', []))})" for s in failed)
    else:
        tone = "idle"
        text = "Not published yet: the run has not finished its publish stage"
    if fig["state"] == "withdrawn":
        text += " · the withdrawn triplets (triplets.rejected/) are shown below"
    return f'<div class="banner {tone}">{escape(text)}</div>'


def _overview(fig: dict[str, Any], cfg: PipelineConfig) -> str:
    instr = fig.get("instructions") or {}
    g = fig["gates"]
    cards = [
        _kpi(_int(fig["images_in"]), "inputs seen"),
        _kpi(_int(fig["images_usable"]), "usable images", f"{_pct(fig['quarantine_rate'])} quarantined"),
        _kpi(_int(fig["pairs"]), "mined pairs"),
        _kpi(_int(fig["annotated"]), "annotated", f"{_pct(fig['failure_rate'])} failed"),
        _kpi(_int(fig["published"]), "published triplets",
             f"{_int(fig['excluded_by_curators'])} withheld by curators",
             "accent" if fig["state"] == "published" else "fail"),
        _kpi(_num(instr.get("mean_per_pair")), "instructions per triplet",
             f"distinct-2 {_num(instr.get('distinct_2'), 3)}"),
        _kpi(f"{g.get('pass', 0)} / {g.get('warn', 0)} / {g.get('fail', 0)}", "gates pass / warn / fail",
             tone="fail" if g.get("fail") else "warn" if g.get("warn") else "ok"),
    ]
    a = cfg.annotate
    setup = _table(["", ""], [
        ["encoders", ", ".join(f"{escape(e.name)} <span class=dim>({escape(e.kind)}, band {e.band[0]:g}–{e.band[1]:g})</span>"
                               for e in cfg.encoders)],
        ["describe", f"{escape(a.describe.backend)} {escape(a.describe.model or '')}"],
        ["instruct", f"{escape(a.instruct.backend)} {escape(a.instruct.model or '')}"],
        ["mining", f"k={cfg.mining.k}, ≤{cfg.mining.max_targets_per_query} targets per query, "
                   f"{cfg.mining.n_hard_negatives} hard negatives" + _mining_modes(fig.get("mining") or {})],
        ["run directory", f"<code>{escape(fig['run_dir'])}</code>"],
    ], cls="setup")
    return _section("overview", "Overview", f'<div class="kpis">{"".join(cards)}</div>{setup}')


def _mining_modes(modes: dict[str, Any]) -> str:
    lines = []
    for name, m in modes.items():
        if not m:
            continue
        if m["mode"] == "incremental":
            what = (f"incremental from <b>{escape(str(m['parent']))}</b>: {_int(m['queries_from_parent'])} of "
                    f"{_int(m['queries'])} queries reused their retrieved set")
        else:
            what = f"full <span class=dim>({escape(str(m['reason'] or ''))})</span>"
        lines.append(f"<div>{escape(name)}: {what}</div>")
    return "".join(lines)


def _gates_section(suites: list[dict[str, Any]], layout: RunLayout) -> str:
    docs = layout.data_docs_dir / "index.html"
    link = ('<p>Every expectation, with unexpected values: <a href="data_docs/index.html">Great Expectations '
            "Data Docs</a>.</p>") if docs.is_file() else _missing("Great Expectations Data Docs (no gate has run)")
    if not suites:
        return _section("gates", "Gates", _missing("gate results (no validation has run)") + link)
    rows = []
    for s in suites:
        for g in s.get("gates", []):
            sign = "≤" if g["bound"] == "max" else "≥"
            threshold = "off" if g["threshold"] is None else f"{sign} {g['threshold']:g}"
            observed = "–" if g.get("observed") is None else f"{g['observed']:.4g}"
            rows.append([_badge(g["status"]), f"<b>{escape(g['gate'])}</b><div class=dim>{escape(g['what'])}</div>",
                         observed, threshold, escape(g["severity"]), escape(g.get("detail") or ""),
                         f"<code>{escape(s['suite'])}</code>"])
    gate_table = _table(["", "gate", "observed", "threshold", "on breach", "detail", "suite"], rows,
                        numeric=(2, 3), cls="gates") if rows else ""
    suite_rows = [[_badge("pass" if s.get("success") else "fail"), f"<code>{escape(s['suite'])}</code>",
                   _int(s.get("rows")), _int(s.get("evaluated")),
                   escape(", ".join(s.get("failed_expectations", [])) or "–"),
                   escape("; ".join(s.get("warnings", [])) or "–")] for s in suites]
    suite_table = _table(["", "suite", "rows", "expectations", "failed", "warnings"], suite_rows,
                         numeric=(2, 3), cls="suites")
    intro = ("Quality gates beyond schema. A <b>fail</b> gate stops the stage, so nothing downstream runs and "
             "nothing publishes; a <b>warn</b> gate is reported here and in stats.json. Thresholds live in the "
             "<code>gates:</code> section of the config.")
    return _section("gates", "Gates", gate_table + "<h3>Suites</h3>" + suite_table + link, intro)


def _funnel_section(cfg: PipelineConfig, layout: RunLayout, fig: dict[str, Any],
                    quarantine: list[dict[str, Any]], failures: list[dict[str, Any]]) -> str:
    names = [e.name for e in cfg.encoders]
    pairs_status = load_status(layout, "pairs") or {}
    image_rows = [("inputs seen", fig["images_in"] or 0, charts.MUTED)]
    if fig.get("duplicates_collapsed"):
        image_rows.append(("exact copies collapsed", fig["duplicates_collapsed"], "#e0b084"))
    image_rows += [("quarantined", fig["quarantined"], "#d46a6a"),
                   ("usable images", fig["images_usable"] or 0, charts.INK)]
    image_rows += [(f"embedded · {n}", fig["embedded"].get(n) or 0, _enc_colour(names, n)) for n in names]
    pair_rows = [(f"candidates · {n}", fig["candidates"].get(n) or 0, _enc_colour(names, n)) for n in names]
    if pairs_status:
        union = pairs_status.get("union_pairs", 0)
        after_dedup = union - pairs_status.get("near_duplicates_dropped", 0)
        pair_rows += [("distinct (query, target)", union, charts.MUTED),
                      ("not near-duplicates", after_dedup, charts.MUTED),
                      ("within per-query cap", after_dedup - pairs_status.get("over_query_cap_dropped", 0), charts.MUTED)]
    pair_rows += [("pairs with hard negatives", fig["pairs"] or 0, charts.INK),
                  ("annotated", fig["annotated"] or 0, "#5a8fd8")]
    if fig["excluded_by_curators"]:
        pair_rows.append(("withheld by curators", fig["excluded_by_curators"], "#d46a6a"))
    pair_rows.append(("published", fig["published"], "#2f9e6e"))
    body = ('<div class="grid2"><div><h3>Images</h3>' + charts.hbars(image_rows, "image funnel")
            + '</div><div><h3>Pairs</h3>' + charts.hbars(pair_rows, "pair funnel") + "</div></div>")

    def problem_table(rows: list[dict[str, Any]], what: str) -> str:
        if not rows:
            return f'<p class="dim">No {what}.</p>'
        return _table(["stage", "reason", "rows", "example"],
                      [[escape(r["stage"] or ""), f"<code>{escape(r['reason'] or '')}</code>", _int(r["n"]),
                        f'<span class="dim">{escape((r["example"] or "")[:160])}</span>'] for r in rows],
                      numeric=(2,))
    body += ('<div class="grid2"><div><h3>Quarantined inputs by reason</h3>' + problem_table(quarantine, "quarantined inputs")
             + '</div><div><h3>Pairs not published, by reason</h3>' + problem_table(failures, "failed or withheld pairs")
             + "</div></div>")
    body += ('<div class="grid2"><div><h3>Dropped by the pairs stage</h3>' + _pairs_dropped(pairs_status)
             + '</div><div><h3>Model answers rejected, by step</h3>' + _rejected_answers(load_status(layout, "annotate"))
             + "</div></div>")
    intro = ("From every input the corpus offered to every published triplet. Losses are listed by reason; "
             "<code>quarantine.parquet</code> and <code>failures.parquet</code> hold every row.")
    return _section("funnel", "Funnel", body, intro)


_DROP_REASONS = {
    "near_duplicate_of_query": "the target is a perceptual near-duplicate of the query (pairs.near_duplicate_hamming)",
    "over_query_cap": "beyond the query's pairs.max_pairs_per_query best pairs",
    "insufficient_hard_negatives": "fewer eligible hard negatives than mining.n_hard_negatives (in failures.parquet)",
}


def _pairs_dropped(pairs_status: dict[str, Any]) -> str:
    dropped = pairs_status.get("dropped_by_reason")
    if dropped is None:
        return _missing("the pairs stage's record")
    rows = [[f"<code>{escape(k)}</code>", _int(v), f'<span class="dim">{escape(_DROP_REASONS.get(k, ""))}</span>']
            for k, v in dropped.items()]
    return _table(["reason", "(query, target)", "why"], rows, numeric=(1,))


def _rejected_answers(annotate_status: dict[str, Any] | None) -> str:
    """Every model answer that failed, by step and reason: a pair is re-sampled after each, so
    this counts tries, and failures.parquet holds the pairs whose tries ran out."""
    steps = (annotate_status or {}).get("steps")
    if not steps:
        return _missing("the annotate stage's record")
    rows = [[escape(step), f"<code>{escape(reason)}</code>", _int(n)]
            for step in ("describe", "instruct") for reason, n in (steps.get(step, {}).get("attempt_failures") or {}).items()]
    if not rows:
        return '<p class="dim">Every model answer passed its checks.</p>'
    return _table(["step", "reason", "tries"], rows, numeric=(2,))


def _similarity_section(cfg: PipelineConfig, sims: dict[str, dict[str, Any] | None]) -> str:
    blocks = []
    names = [e.name for e in cfg.encoders]
    for enc in cfg.encoders:
        data = sims.get(enc.name)
        if not data:
            blocks.append(f"<div><h3>{escape(enc.name)}</h3>{_missing('neighbours and candidates')}</div>")
            continue
        bins = data["bins"]
        first = min(bins[0], int(round(enc.band[0] / SIM_BIN)) - 5)
        last = max(bins[-1], int(round(1.0 / SIM_BIN)) - 1)
        idx = list(range(first, last + 1))
        edges = [round(i * SIM_BIN, 6) for i in idx] + [round((last + 1) * SIM_BIN, 6)]
        neigh = [data["neighbours"].get(i, 0) for i in idx]
        cand = [data["candidates"].get(i, 0) for i in idx]
        chart = charts.histogram(
            edges, [("retrieved neighbours", neigh, charts.MUTED),
                    ("kept candidates", cand, _enc_colour(names, enc.name))],
            f"similarity histogram of {enc.name}", band=enc.band, x_label="cosine similarity")
        blocks.append(
            f"<div><h3>{escape(enc.name)} <span class=dim>({escape(enc.kind)})</span></h3>{chart}"
            f'<p class="legend"><i style="background:{charts.MUTED}"></i>retrieved neighbours '
            f"({_int(data['neighbours_total'])}) <i style=\"background:{_enc_colour(names, enc.name)}\"></i>"
            f"kept candidates ({_int(data['candidates_total'])}) <i style=\"background:{charts.BAND}\"></i>"
            f"band {enc.band[0]:g}–{enc.band[1]:g}</p></div>")
    intro = ("Cosine similarity of every retrieved neighbour per encoder; a pair is kept only strictly inside "
             "the band (too weak below, near-duplicate above).")
    return _section("similarity", "Similarity", f'<div class="grid2">{"".join(blocks)}</div>', intro)


def _overlap_section(cfg: PipelineConfig, combos: list[dict[str, Any]], published: list[dict[str, Any]]) -> str:
    if not combos:
        return _section("overlap", "Encoder overlap", _missing("pairs"))
    names = [e.name for e in cfg.encoders]
    n_views = len(names)
    by_views = [sum(int(r["pairs"]) for r in combos if r["views"] == v) for v in range(1, n_views + 1)]
    chart = charts.vbars([f"{v} view{'s' if v > 1 else ''}" for v in range(1, n_views + 1)], by_views,
                         "pairs by number of views", x_label="found by", width=360)
    total = sum(by_views) or 1
    pub = {r["combination"]: int(r["pairs"]) for r in published}
    pub_total = sum(pub.values()) or 1
    rows = [['<span class="combo">' + " + ".join(f'<span class="enc" style="--c:{_enc_colour(names, n)}">{escape(n)}</span>'
                                                 for n in r["combination"].split(" + ")) + "</span>",
             _int(r["pairs"]), _pct(int(r["pairs"]) / total) + " " + charts.share_bar(int(r["pairs"]) / total),
             _int(pub.get(r["combination"], 0)), _pct(pub.get(r["combination"], 0) / pub_total)]
            for r in combos]
    table = _table(["views", "pairs", "share", "published", "share"], rows, numeric=(1, 2, 3, 4))
    intro = "Which similarity views found each pair: agreement of several views marks the most evident relations."
    return _section("overlap", "Encoder overlap", f'<div class="grid2"><div>{chart}</div><div>{table}</div></div>', intro)


def _instructions_section(instr: dict[str, Any] | None, source: str, cfg: PipelineConfig) -> str:
    if not instr or not instr["instructions"]:
        return _section("instructions", "Instructions", _missing("instructions (nothing annotated yet)"))
    g = cfg.gates
    cards = [
        _kpi(_int(instr["instructions"]), "instructions", f"{_int(instr['distinct_instructions'])} distinct"),
        _kpi(_num(instr["mean_per_pair"]), "per triplet"),
        _kpi(_num(instr["words"]["mean"], 1), "words on average",
             f"median {instr['words']['median']:g}, 5–95%: {instr['words']['p5']:g}–{instr['words']['p95']:g}"),
        _kpi(_int(instr["vocabulary"]), "vocabulary (distinct words)"),
        _kpi(_num(instr["distinct_1"], 3), "distinct-1", f"on {_int(instr['distinct_n_sample'])} sampled"),
        _kpi(_num(instr["distinct_2"], 3), "distinct-2", f"gate ≥ {g.distinct_2gram_ratio.min}"
             if g.distinct_2gram_ratio.min is not None else ""),
    ]
    per_pair = instr["per_pair"]
    c1 = charts.vbars([str(k) for k in per_pair], list(per_pair.values()), "instructions per triplet",
                      x_label="instructions per triplet", width=300)
    lengths = instr["length_histogram"]
    lo, hi = (min(lengths), max(lengths)) if lengths else (0, 0)
    c2 = charts.vbars([str(k) for k in range(lo, hi + 1)], [lengths.get(k, 0) for k in range(lo, hi + 1)],
                      "instruction length in words", colour=charts.PALETTE[2], x_label="words", width=520)
    limit = g.instruction_share.max
    top = _table(["most repeated instructions", "triplets", "share"], [
        [escape(r["instruction"]), _int(r["pairs"]),
         _pct(r["share"]) + " " + charts.share_bar(r["share"], "#d46a6a" if limit is not None and r["share"] > limit
                                                   else charts.PALETTE[0])]
        for r in instr["top_instructions"]], numeric=(1, 2))
    olimit = g.opening_share.max
    openings = _table(["most common openings", "instructions", "share"], [
        [f"“{escape(r['opening'])} …”", _int(r["instructions"]),
         _pct(r["share"]) + " " + charts.share_bar(r["share"], "#d46a6a" if olimit is not None and r["share"] > olimit
                                                   else charts.PALETTE[1])]
        for r in instr["top_openings"]], numeric=(1, 2))
    what = {"published": "the published triplets", "withdrawn": "the withdrawn triplets",
            "none": "the accepted annotations"}[source]
    intro = (f"Statistics of {what}. A model that collapses onto one template shows up as one instruction held "
             "by many triplets, one opening over most instructions and a low distinct-2 (distinct word bigrams "
             "over all bigrams, on a fixed-size seeded sample so runs of any size compare).")
    body = (f'<div class="kpis">{"".join(cards)}</div><div class="grid2"><div>{c1}</div><div>{c2}</div></div>'
            f'<div class="grid2"><div>{top}</div><div>{openings}</div></div>')
    return _section("instructions", "Instructions", body, intro)


def _img(image: dict[str, Any] | None, sizes: dict[str, tuple[int, int]], cls: str, alt: str) -> str:
    image_id = image["image_id"] if image else None
    if image_id and image_id in sizes:
        w, h = sizes[image_id]
        return (f'<img class="{cls}" src="thumbs/{escape(image_id)}.jpg" width="{w}" height="{h}" '
                f'alt="{escape(alt)}" title="{escape((image or {}).get("caption") or "")}">')
    return (f'<svg class="{cls} placeholder" viewBox="0 0 100 100" role="img" aria-label="image unavailable" '
            'xmlns="http://www.w3.org/2000/svg"><rect width="100" height="100" fill="#eef1f5"/>'
            '<text x="50" y="54" text-anchor="middle" font-size="10" fill="#8a94a3">unavailable</text></svg>')


def _gallery_section(cfg: PipelineConfig, picked: list[dict[str, Any]], sizes: dict[str, tuple[int, int]],
                     source: str) -> str:
    if not picked:
        return _section("gallery", "Gallery", _missing("triplets to sample"))
    names = [e.name for e in cfg.encoders]
    cards = []
    stratum = None
    for r in picked:
        if r["stratum"] != stratum:
            stratum = r["stratum"]
            cards.append(f'<h3 class="stratum"><span class="enc" style="--c:{_enc_colour(names, stratum)}">'
                         f"{escape(stratum)}</span> found these</h3>")
        images = r.get("images", {})
        q, t = images.get(r["q_img"]), images.get(r["t_img"])
        views = " ".join(f'<span class="enc" style="--c:{_enc_colour(names, e)}">{escape(e)} {s:.3f}</span>'
                         for e, s in zip(r["encoders"], r["sims"]))
        instructions = "".join(f"<li>{escape(x)}</li>" for x in r["q_text"])
        hns = "".join(
            f'<figure class="hn">{_img(images.get(p), sizes, "thumb-s", "hard negative")}'
            f"<figcaption><code>{escape((images.get(p) or {}).get('image_id') or '?')}</code></figcaption></figure>"
            for p in r["hns"][1:])

        def side(img: dict[str, Any] | None, role: str) -> str:
            return (f'<figure class="side">{_img(img, sizes, "thumb", role)}<figcaption><b>{role}</b> '
                    f"{escape((img or {}).get('caption') or '')}"
                    f"<br><code>{escape((img or {}).get('image_id') or '?')}</code></figcaption></figure>")
        cards.append(
            f'<article class="triplet"><header>{views}<span class="pid">pair <code>{escape(r["pair_id"])}</code>'
            f"</span></header>"
            f'<div class="qt">{side(q, "query")}<div class="arrow"><ol class="instr">{instructions}</ol></div>'
            f'{side(t, "target")}</div>'
            f'<div class="hns"><span class="dim">hard negatives</span>{hns}</div>'
            f"<details><summary>Description ({_int(r['word_num'])} words requested)</summary>"
            f"<p>{escape(r['description'] or '')}</p></details></article>")
    intro = (f"{len(picked)} triplets of the {source} set, sampled with seed {cfg.seed}: "
             f"{cfg.curation.gallery_per_encoder} per encoder that found them. Ids are what the rejects file "
             "takes (see Curation).")
    return _section("gallery", "Gallery", "".join(cards), intro)


def _curation_section(cfg: PipelineConfig, layout: RunLayout, failures: list[dict[str, Any]]) -> str:
    status = (load_status(layout, "publish") or {}).get("curation") or {}
    excluded = [r for r in failures if r["stage"] == "curation"]
    path = cfg.curation.rejects_file
    rows = [["rejects file", f"<code>{escape(str(status.get('rejects_file') or path or 'none configured'))}</code>"]]
    if status:
        rows += [["listed pairs / images", f"{_int(status.get('rejected_pairs'))} / {_int(status.get('rejected_images'))}"],
                 ["listed ids not in this run", f"{_int(status.get('unmatched_pair_ids'))} pairs, "
                                                f"{_int(status.get('unmatched_image_ids'))} images"],
                 ["pairs withheld", _int(status.get("excluded"))],
                 ["hard negatives replaced", f"{_int(status.get('negatives_replaced'))} in "
                                             f"{_int(status.get('pairs_with_replaced_negatives'))} pairs "
                                             f"(policy: {escape(cfg.curation.rejected_negatives)})"]]
    body = _table(["", ""], rows, cls="setup")
    if excluded:
        body += _table(["reason", "pairs", "example"], [
            [f"<code>{escape(r['reason'])}</code>", _int(r["n"]), f'<span class="dim">{escape(r["example"] or "")}</span>']
            for r in excluded], numeric=(1,))
    body += ("<p>To withhold something from the next publish, add a line to the rejects file "
             "(<code>curation.rejects_file</code>):</p><pre>kind,id,reason\npair,&lt;pair id&gt;,instruction names "
             "the wrong object\nimage,&lt;image id&gt;,watermark</pre><p class=dim>A rejected image withholds every "
             "pair it is the query or target of; as a hard negative it is replaced by another image from the "
             "query's retrieved set.</p>")
    return _section("curation", "Curation", body)


_COMPARED = (
    ("inputs seen", ("images_in",), _int), ("quarantine rate", ("quarantine_rate",), _pct),
    ("mined pairs", ("pairs",), _int), ("annotated", ("annotated",), _int),
    ("annotation failure rate", ("failure_rate",), _pct),
    ("withheld by curators", ("excluded_by_curators",), _int), ("published triplets", ("published",), _int),
    ("instructions per triplet", ("instructions", "mean_per_pair"), _num),
    ("words per instruction", ("instructions", "mean_words"), lambda x: _num(x, 1)),
    ("vocabulary", ("instructions", "vocabulary"), _int),
    ("distinct-2", ("instructions", "distinct_2"), lambda x: _num(x, 3)),
    ("top instruction share", ("instructions", "instruction_share"), _pct),
    ("top opening share", ("instructions", "opening_share"), _pct),
)


def _dig(d: dict[str, Any] | None, keys: Sequence[str]) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _comparison_section(fig: dict[str, Any], prev: dict[str, Any] | None, names: Sequence[str]) -> str:
    if prev is None:
        return _section("comparison", "Comparison", '<p class="dim">No previous run to compare with '
                        "(<code>curation.compare_with</code>, or <code>megapairs report --previous RUN_DIR</code>).</p>")
    if "error" in prev:
        return _section("comparison", "Comparison", _missing(f"previous run {prev['run_dir']} ({prev['error']})"))
    compared = list(_COMPARED) + [(f"candidates · {n}", ("candidates", n), _int) for n in names]
    rows = []
    for label, keys, fmt in compared:
        now, before = _dig(fig, keys), _dig(prev, keys)
        change = ""
        if isinstance(now, (int, float)) and isinstance(before, (int, float)):
            delta = now - before
            if fmt(now) == fmt(before):
                change = "±0"
            elif fmt is _pct:  # rates change in percentage points
                change = f"{100 * delta:+.1f} pp"
            else:
                change = ("+" if delta > 0 else "−") + fmt(abs(delta)) + (f" ({delta / before:+.1%})" if before else "")
        rows.append([escape(label), fmt(now), fmt(before), change])
    head = f"this run <code>{escape(str(fig['run_id']))}</code>"
    prev_head = f"previous <code>{escape(str(prev.get('run_id')))}</code>"
    intro = f"Against <code>{escape(str(prev.get('run_dir')))}</code>."
    return _section("comparison", "Comparison", _table(["", head, prev_head, "change"], rows, numeric=(1, 2, 3)), intro)


CSS = """
:root{--ink:#1f2933;--dim:#6b7685;--line:#e4e8ee;--bg:#f6f8fb;--card:#fff;--ok:#2f9e6e;--warn:#c98a12;--fail:#c94a4a}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--ink);background:var(--bg)}
header.top{background:#16202c;color:#fff;padding:18px 32px 0}
header.top h1{margin:0;font-size:20px;font-weight:600}
header.top .sub{color:#aab4c2;margin:4px 0 12px;font-size:13px}
header.top code{background:#263345;color:#fff;font-size:16px}
nav{display:flex;gap:2px;flex-wrap:wrap}
nav a{color:#d3dae4;text-decoration:none;padding:8px 12px;border-radius:6px 6px 0 0;font-size:13px}
nav a:hover{background:#263345;color:#fff}
main{max-width:1280px;margin:0 auto;padding:20px 32px 60px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:18px 0}
h2{margin:0 0 8px;font-size:18px}
h3{margin:16px 0 8px;font-size:14px;color:#3d4752}
p.intro{color:var(--dim);margin:0 0 12px;max-width:900px}
.banner{padding:12px 18px;border-radius:8px;font-weight:600;margin-top:4px}
.banner.ok{background:#e5f5ec;color:#1d6b48}.banner.warn{background:#fdf3dc;color:#8a5d00}
.banner.fail{background:#fbe5e5;color:#912f2f}.banner.idle{background:#eef1f5;color:#4a5563}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px;margin:6px 0 12px}
.kpi{border:1px solid var(--line);border-radius:8px;padding:10px 12px;background:#fbfcfe}
.kpi-value{font-size:22px;font-weight:650;font-variant-numeric:tabular-nums}
.kpi-label{color:var(--dim);font-size:12px}.kpi-note{font-size:12px;color:#4a5563;margin-top:2px}
.kpi.accent{border-color:#9cd3b8;background:#f1faf5}.kpi.fail{border-color:#eab0b0;background:#fdf3f3}
.kpi.warn{border-color:#ecd08c;background:#fffaf0}.kpi.ok{border-color:#b9dfca}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:13px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--dim);font-weight:600;font-size:12px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.setup td:first-child{color:var(--dim);width:190px}
.dim{color:var(--dim)}.missing{color:var(--dim);font-style:italic}
code{font:12px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f3f7;padding:1px 4px;border-radius:4px}
pre{background:#f0f3f7;padding:10px 12px;border-radius:6px;font-size:12px}
.badge{display:inline-block;min-width:52px;text-align:center;padding:2px 8px;border-radius:10px;font-size:11px;font-weight:700;text-transform:uppercase;letter-spacing:.03em}
.badge.pass{background:#e5f5ec;color:#1d6b48}.badge.warn{background:#fdf3dc;color:#8a5d00}
.badge.fail{background:#fbe5e5;color:#912f2f}.badge.skipped,.badge.off{background:#eef1f5;color:#6b7685}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:18px}
svg.chart{max-width:100%;height:auto;font-family:inherit}
svg .lbl{font-size:12px;fill:#3d4752}svg .val{font-size:12px;fill:#3d4752;font-variant-numeric:tabular-nums}
svg .tick{font-size:10px;fill:#7b8594}svg .band{fill:#2f9e6e;font-weight:600}
svg.sharebar{vertical-align:middle;margin-left:6px}
.legend{font-size:12px;color:var(--dim)}.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
.enc{display:inline-block;border-left:4px solid var(--c);background:#f3f5f8;padding:1px 7px;border-radius:4px;font-size:12px;margin-right:4px;white-space:nowrap}
h3.stratum{margin-top:22px}.combo{white-space:nowrap}
article.triplet{border:1px solid var(--line);border-radius:10px;padding:12px 14px;margin:10px 0;background:#fcfdfe}
article.triplet header{display:flex;flex-wrap:wrap;gap:4px;align-items:center;margin-bottom:8px}
.pid{margin-left:auto;font-size:12px;color:var(--dim)}
.qt{display:grid;grid-template-columns:230px 1fr 230px;gap:16px;align-items:start}
figure{margin:0}figure.side figcaption{font-size:12px;margin-top:4px;color:#3d4752}
img.thumb,svg.thumb{width:224px;height:auto;max-height:224px;object-fit:contain;border-radius:6px;background:#eef1f5;display:block}
img.thumb-s,svg.thumb-s{width:84px;height:84px;object-fit:cover;border-radius:5px;display:block;background:#eef1f5}
.arrow{position:relative;padding:4px 0}
ol.instr{margin:0;padding-left:20px}ol.instr li{margin:0 0 6px;padding:6px 8px;background:#f3f6fb;border-radius:6px}
.hns{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-end;margin-top:10px}
.hns>span{font-size:12px;align-self:center;margin-right:4px}
figure.hn figcaption code{font-size:10px}
details{margin-top:8px}summary{cursor:pointer;color:#3b6fd8;font-size:13px}
details p{background:#f6f8fb;padding:8px 10px;border-radius:6px;margin:6px 0 0}
footer{color:var(--dim);font-size:12px;text-align:center;margin:20px 0}
@media (max-width:900px){.qt{grid-template-columns:1fr}.grid2{grid-template-columns:1fr}}
"""


def _page(cfg: PipelineConfig, fig: dict[str, Any], banner: str, body: str) -> str:
    nav = "".join(f'<a href="#{k}">{escape(t)}</a>' for k, t in SECTIONS)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        # No network, no script: the page may only load its own files.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>MegaPairs run {escape(str(fig['run_id']))}</title><style>{CSS}</style></head><body>"
        f"<header class=\"top\"><h1>MegaPairs curator report · <code>{escape(str(fig['run_id']))}</code></h1>"
        f"<div class=\"sub\">{escape(fig['run_dir'])} · generated {escape(fig['generated_at'])}</div>"
        f"<nav>{nav}<a href=\"data_docs/index.html\">Data Docs ↗</a></nav></header>"
        f"<main>{banner}{body}<footer>Figures: <a href=\"summary.json\">summary.json</a> · "
        "<a href=\"stats.json\">stats.json</a> · built by <code>megapairs report</code></footer></main>"
        "</body></html>"
    )


# ---------------------------------------------------------------- entry point


def build_report(cfg: PipelineConfig, layout: RunLayout, previous: RunLayout | None = None) -> dict[str, Any]:
    """Build `reports/index.html` (and thumbnails, summary.json) for the run in `layout`.
    `previous` is the run to compare with; None looks it up by `curation.compare_with`
    (see `find_previous_run`). Works on unfinished and unpublished runs too."""
    from megapairs_ops.stages.publish.triplets import run_config_path, write_run_config
    from megapairs_ops.quality.gates import load_gate_results

    t0 = time.perf_counter()
    if not layout.root.is_dir():
        raise FileNotFoundError(f"run directory {layout.root} does not exist")
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    # What a killed report left: its temp files and folders, and DuckDB's spill files.
    for path in (report_index(layout), thumbs_dir(layout), summary_path(layout), layout.stats):
        sweep_temps(path)
    clear_dir(layout.spill_dir("report"))
    if not run_config_path(layout).is_file():  # publish records the run's own; keep that one
        write_run_config(cfg, layout)
    previous = previous if previous is not None else find_previous_run(cfg, layout)
    memory_limit = cfg.pairs.memory_limit
    names = [e.name for e in cfg.encoders]
    parts, source = triplet_source(layout)
    db = _Db(layout, memory_limit)
    try:
        quarantine = _problems(db, layout.root / "quarantine")
        failures = _problems(db, layout.root / "failures")
        sims = {n: _similarity(db, layout, n) for n in names}
        combos = _combinations(db, [layout.pairs])
        published = _combinations(db, parts) if source == "published" else []
        instr = _instructions(layout, parts, memory_limit)
        fig = collect_figures(layout, names, memory_limit, _db=db, _instr=instr)
        picked = _gallery(db, cfg, layout, parts)
    finally:
        db.close()
    sizes = _make_thumbs(picked, layout, cfg.ingest.max_pixels)
    suites = load_gate_results(layout)
    prev = _previous_figures(previous, memory_limit)
    body = "".join([
        _overview(fig, cfg),
        _gates_section(suites, layout),
        _funnel_section(cfg, layout, fig, quarantine, failures),
        _similarity_section(cfg, sims),
        _overlap_section(cfg, combos, published),
        _instructions_section(instr, source, cfg),
        _gallery_section(cfg, picked, sizes, source),
        _curation_section(cfg, layout, failures),
        _comparison_section(fig, prev, names),
    ])
    write_json(fig, summary_path(layout))
    index = report_index(layout)
    with atomic_path(index) as tmp:
        tmp.write_text(_page(cfg, fig, _banner(fig, suites), body), encoding="utf-8")
    return {
        "report": str(index),
        "state": source,
        "gallery": len(picked),
        "thumbnails": len(sizes),
        "previous": str(previous.root) if previous else None,
        "gates": fig["gates"],
        "seconds_report": round(time.perf_counter() - t0, 3),
    }
