"""The sections on the pipeline's health: banner, overview, gates, funnel (every loss by
reason), similarity per encoder, encoder overlap."""

from __future__ import annotations

from html import escape
from typing import Any

from megapairs_ops.config import PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import load_status

from . import charts
from .figures import SIM_BIN
from .html import (
    encoder_colour,
    fmt_int,
    fmt_num,
    fmt_pct,
    html_table,
    kpi_tile,
    missing_note,
    section_frame,
    status_badge,
)


def banner_html(fig: dict[str, Any], suites: list[dict[str, Any]]) -> str:
    failed = [s for s in suites if not s.get("success", True)]
    warn = fig["gates"].get("warn", 0)
    if fig["state"] == "published":
        tone = "warn" if warn else "ok"
        text = f"Published {fmt_int(fig['published'])} triplets" + (f" · {warn} gate warning(s)" if warn else "")
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


def overview_section(fig: dict[str, Any], cfg: PipelineConfig) -> str:
    instr = fig.get("instructions") or {}
    g = fig["gates"]
    cards = [
        kpi_tile(fmt_int(fig["images_in"]), "inputs seen"),
        kpi_tile(fmt_int(fig["images_usable"]), "usable images", f"{fmt_pct(fig['quarantine_rate'])} quarantined"),
        kpi_tile(fmt_int(fig["pairs"]), "mined pairs"),
        kpi_tile(fmt_int(fig["annotated"]), "annotated", f"{fmt_pct(fig['failure_rate'])} failed"),
        kpi_tile(fmt_int(fig["published"]), "published triplets",
             f"{fmt_int(fig['excluded_by_curators'])} withheld by curators",
             "accent" if fig["state"] == "published" else "fail"),
        kpi_tile(fmt_num(instr.get("mean_per_pair")), "instructions per triplet",
             f"distinct-2 {fmt_num(instr.get('distinct_2'), 3)}"),
        kpi_tile(f"{g.get('pass', 0)} / {g.get('warn', 0)} / {g.get('fail', 0)}", "gates pass / warn / fail",
             tone="fail" if g.get("fail") else "warn" if g.get("warn") else "ok"),
    ]
    a = cfg.annotate
    setup = html_table(["", ""], [
        ["encoders", ", ".join(f"{escape(e.name)} <span class=dim>({escape(e.kind)}, band {e.band[0]:g}–{e.band[1]:g})</span>"
                               for e in cfg.encoders)],
        ["describe", f"{escape(a.describe.backend)} {escape(a.describe.model or '')}"],
        ["instruct", f"{escape(a.instruct.backend)} {escape(a.instruct.model or '')}"],
        ["mining", f"k={cfg.mining.k}, ≤{cfg.mining.max_targets_per_query} targets per query, "
                   f"{cfg.mining.n_hard_negatives} hard negatives" + _mining_modes(fig.get("mining") or {})],
        ["run directory", f"<code>{escape(fig['run_dir'])}</code>"],
    ], cls="setup")
    return section_frame("overview", "Overview", f'<div class="kpis">{"".join(cards)}</div>{setup}')


def _mining_modes(modes: dict[str, Any]) -> str:
    lines = []
    for name, m in modes.items():
        if not m:
            continue
        if m["mode"] == "incremental":
            what = (f"incremental from <b>{escape(str(m['parent']))}</b>: {fmt_int(m['queries_from_parent'])} of "
                    f"{fmt_int(m['queries'])} queries reused their retrieved set")
        else:
            what = f"full <span class=dim>({escape(str(m['reason'] or ''))})</span>"
        lines.append(f"<div>{escape(name)}: {what}</div>")
    return "".join(lines)


def gates_section(suites: list[dict[str, Any]], layout: RunLayout) -> str:
    docs = layout.data_docs_dir / "index.html"
    link = ('<p>Every expectation, with unexpected values: <a href="data_docs/index.html">Great Expectations '
            "Data Docs</a>.</p>") if docs.is_file() else missing_note("Great Expectations Data Docs (no gate has run)")
    if not suites:
        return section_frame("gates", "Gates", missing_note("gate results (no validation has run)") + link)
    rows = []
    for s in suites:
        for g in s.get("gates", []):
            sign = "≤" if g["bound"] == "max" else "≥"
            threshold = "off" if g["threshold"] is None else f"{sign} {g['threshold']:g}"
            observed = "–" if g.get("observed") is None else f"{g['observed']:.4g}"
            rows.append([status_badge(g["status"]), f"<b>{escape(g['gate'])}</b><div class=dim>{escape(g['what'])}</div>",
                         observed, threshold, escape(g["severity"]), escape(g.get("detail") or ""),
                         f"<code>{escape(s['suite'])}</code>"])
    gate_table = html_table(["", "gate", "observed", "threshold", "on breach", "detail", "suite"], rows,
                        numeric=(2, 3), cls="gates") if rows else ""
    suite_rows = [[status_badge("pass" if s.get("success") else "fail"), f"<code>{escape(s['suite'])}</code>",
                   fmt_int(s.get("rows")), fmt_int(s.get("evaluated")),
                   escape(", ".join(s.get("failed_expectations", [])) or "–"),
                   escape("; ".join(s.get("warnings", [])) or "–")] for s in suites]
    suite_table = html_table(["", "suite", "rows", "expectations", "failed", "warnings"], suite_rows,
                         numeric=(2, 3), cls="suites")
    intro = ("Quality gates beyond schema. A <b>fail</b> gate stops the stage, so nothing downstream runs and "
             "nothing publishes; a <b>warn</b> gate is reported here and in stats.json. Thresholds live in the "
             "<code>gates:</code> section of the config.")
    return section_frame("gates", "Gates", gate_table + "<h3>Suites</h3>" + suite_table + link, intro)


def funnel_section(cfg: PipelineConfig, layout: RunLayout, fig: dict[str, Any],
                    quarantine: list[dict[str, Any]], failures: list[dict[str, Any]]) -> str:
    names = [e.name for e in cfg.encoders]
    pairs_status = load_status(layout, "pairs") or {}
    image_rows = [("inputs seen", fig["images_in"] or 0, charts.MUTED)]
    if fig.get("duplicates_collapsed"):
        image_rows.append(("exact copies collapsed", fig["duplicates_collapsed"], "#e0b084"))
    image_rows += [("quarantined", fig["quarantined"], "#d46a6a"),
                   ("usable images", fig["images_usable"] or 0, charts.INK)]
    image_rows += [(f"embedded · {n}", fig["embedded"].get(n) or 0, encoder_colour(names, n)) for n in names]
    pair_rows = [(f"candidates · {n}", fig["candidates"].get(n) or 0, encoder_colour(names, n)) for n in names]
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
        return html_table(["stage", "reason", "rows", "example"],
                      [[escape(r["stage"] or ""), f"<code>{escape(r['reason'] or '')}</code>", fmt_int(r["n"]),
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
    return section_frame("funnel", "Funnel", body, intro)


_DROP_REASONS = {
    "near_duplicate_of_query": "the target is a perceptual near-duplicate of the query (pairs.near_duplicate_hamming)",
    "over_query_cap": "beyond the query's pairs.max_pairs_per_query best pairs",
    "insufficient_hard_negatives": "fewer eligible hard negatives than mining.n_hard_negatives (in failures.parquet)",
}


def _pairs_dropped(pairs_status: dict[str, Any]) -> str:
    dropped = pairs_status.get("dropped_by_reason")
    if dropped is None:
        return missing_note("the pairs stage's record")
    rows = [[f"<code>{escape(k)}</code>", fmt_int(v), f'<span class="dim">{escape(_DROP_REASONS.get(k, ""))}</span>']
            for k, v in dropped.items()]
    return html_table(["reason", "(query, target)", "why"], rows, numeric=(1,))


def _rejected_answers(annotate_status: dict[str, Any] | None) -> str:
    """Every model answer that failed, by step and reason: a pair is re-sampled after each, so
    this counts tries, and failures.parquet holds the pairs whose tries ran out."""
    steps = (annotate_status or {}).get("steps")
    if not steps:
        return missing_note("the annotate stage's record")
    rows = [[escape(step), f"<code>{escape(reason)}</code>", fmt_int(n)]
            for step in ("describe", "instruct") for reason, n in (steps.get(step, {}).get("attempt_failures") or {}).items()]
    if not rows:
        return '<p class="dim">Every model answer passed its checks.</p>'
    return html_table(["step", "reason", "tries"], rows, numeric=(2,))


def similarity_section(cfg: PipelineConfig, sims: dict[str, dict[str, Any] | None]) -> str:
    blocks = []
    names = [e.name for e in cfg.encoders]
    for enc in cfg.encoders:
        data = sims.get(enc.name)
        if not data:
            blocks.append(f"<div><h3>{escape(enc.name)}</h3>{missing_note('neighbours and candidates')}</div>")
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
                    ("kept candidates", cand, encoder_colour(names, enc.name))],
            f"similarity histogram of {enc.name}", band=enc.band, x_label="cosine similarity")
        blocks.append(
            f"<div><h3>{escape(enc.name)} <span class=dim>({escape(enc.kind)})</span></h3>{chart}"
            f'<p class="legend"><i style="background:{charts.MUTED}"></i>retrieved neighbours '
            f"({fmt_int(data['neighbours_total'])}) <i style=\"background:{encoder_colour(names, enc.name)}\"></i>"
            f"kept candidates ({fmt_int(data['candidates_total'])}) <i style=\"background:{charts.BAND}\"></i>"
            f"band {enc.band[0]:g}–{enc.band[1]:g}</p></div>")
    intro = ("Cosine similarity of every retrieved neighbour per encoder; a pair is kept only strictly inside "
             "the band (too weak below, near-duplicate above).")
    return section_frame("similarity", "Similarity", f'<div class="grid2">{"".join(blocks)}</div>', intro)


def overlap_section(cfg: PipelineConfig, combos: list[dict[str, Any]], published: list[dict[str, Any]]) -> str:
    if not combos:
        return section_frame("overlap", "Encoder overlap", missing_note("pairs"))
    names = [e.name for e in cfg.encoders]
    n_views = len(names)
    by_views = [sum(int(r["pairs"]) for r in combos if r["views"] == v) for v in range(1, n_views + 1)]
    chart = charts.vbars([f"{v} view{'s' if v > 1 else ''}" for v in range(1, n_views + 1)], by_views,
                         "pairs by number of views", x_label="found by", width=360)
    total = sum(by_views) or 1
    pub = {r["combination"]: int(r["pairs"]) for r in published}
    pub_total = sum(pub.values()) or 1
    rows = [['<span class="combo">' + " + ".join(f'<span class="enc" style="--c:{encoder_colour(names, n)}">{escape(n)}</span>'
                                                 for n in r["combination"].split(" + ")) + "</span>",
             fmt_int(r["pairs"]), fmt_pct(int(r["pairs"]) / total) + " " + charts.share_bar(int(r["pairs"]) / total),
             fmt_int(pub.get(r["combination"], 0)), fmt_pct(pub.get(r["combination"], 0) / pub_total)]
            for r in combos]
    table = html_table(["views", "pairs", "share", "published", "share"], rows, numeric=(1, 2, 3, 4))
    intro = "Which similarity views found each pair: agreement of several views marks the most evident relations."
    return section_frame("overlap", "Encoder overlap", f'<div class="grid2"><div>{chart}</div><div>{table}</div></div>', intro)
