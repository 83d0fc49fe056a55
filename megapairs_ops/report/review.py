"""The sections a curator acts on: instruction statistics (the template-collapse detector),
curation (what was withheld and why) and the comparison with the previous run."""

from __future__ import annotations

from html import escape
from typing import Any, Sequence

from megapairs_ops.config import PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import load_status

from . import charts
from .html import fmt_int, fmt_num, fmt_pct, html_table, kpi_tile, missing_note, section_frame


def instructions_section(instr: dict[str, Any] | None, source: str, cfg: PipelineConfig) -> str:
    if not instr or not instr["instructions"]:
        return section_frame("instructions", "Instructions", missing_note("instructions (nothing annotated yet)"))
    g = cfg.gates
    cards = [
        kpi_tile(fmt_int(instr["instructions"]), "instructions", f"{fmt_int(instr['distinct_instructions'])} distinct"),
        kpi_tile(fmt_num(instr["mean_per_pair"]), "per triplet"),
        kpi_tile(fmt_num(instr["words"]["mean"], 1), "words on average",
             f"median {instr['words']['median']:g}, 5–95%: {instr['words']['p5']:g}–{instr['words']['p95']:g}"),
        kpi_tile(fmt_int(instr["vocabulary"]), "vocabulary (distinct words)"),
        kpi_tile(fmt_num(instr["distinct_1"], 3), "distinct-1", f"on {fmt_int(instr['distinct_n_sample'])} sampled"),
        kpi_tile(fmt_num(instr["distinct_2"], 3), "distinct-2", f"gate ≥ {g.distinct_2gram_ratio.min}"
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
    top = html_table(["most repeated instructions", "triplets", "share"], [
        [escape(r["instruction"]), fmt_int(r["pairs"]),
         fmt_pct(r["share"]) + " " + charts.share_bar(r["share"], "#d46a6a" if limit is not None and r["share"] > limit
                                                   else charts.PALETTE[0])]
        for r in instr["top_instructions"]], numeric=(1, 2))
    olimit = g.opening_share.max
    openings = html_table(["most common openings", "instructions", "share"], [
        [f"“{escape(r['opening'])} …”", fmt_int(r["instructions"]),
         fmt_pct(r["share"]) + " " + charts.share_bar(r["share"], "#d46a6a" if olimit is not None and r["share"] > olimit
                                                   else charts.PALETTE[1])]
        for r in instr["top_openings"]], numeric=(1, 2))
    what = {"published": "the published triplets", "withdrawn": "the withdrawn triplets",
            "none": "the accepted annotations"}[source]
    intro = (f"Statistics of {what}. A model that collapses onto one template shows up as one instruction held "
             "by many triplets, one opening over most instructions and a low distinct-2 (distinct word bigrams "
             "over all bigrams, on a fixed-size seeded sample so runs of any size compare).")
    body = (f'<div class="kpis">{"".join(cards)}</div><div class="grid2"><div>{c1}</div><div>{c2}</div></div>'
            f'<div class="grid2"><div>{top}</div><div>{openings}</div></div>')
    return section_frame("instructions", "Instructions", body, intro)


def curation_section(cfg: PipelineConfig, layout: RunLayout, failures: list[dict[str, Any]]) -> str:
    status = (load_status(layout, "publish") or {}).get("curation") or {}
    excluded = [r for r in failures if r["stage"] == "curation"]
    path = cfg.curation.rejects_file
    rows = [["rejects file", f"<code>{escape(str(status.get('rejects_file') or path or 'none configured'))}</code>"]]
    if status:
        rows += [["listed pairs / images", f"{fmt_int(status.get('rejected_pairs'))} / {fmt_int(status.get('rejected_images'))}"],
                 ["listed ids not in this run", f"{fmt_int(status.get('unmatched_pair_ids'))} pairs, "
                                                f"{fmt_int(status.get('unmatched_image_ids'))} images"],
                 ["pairs withheld", fmt_int(status.get("excluded"))],
                 ["hard negatives replaced", f"{fmt_int(status.get('negatives_replaced'))} in "
                                             f"{fmt_int(status.get('pairs_with_replaced_negatives'))} pairs "
                                             f"(policy: {escape(cfg.curation.rejected_negatives)})"]]
    body = html_table(["", ""], rows, cls="setup")
    if excluded:
        body += html_table(["reason", "pairs", "example"], [
            [f"<code>{escape(r['reason'])}</code>", fmt_int(r["n"]), f'<span class="dim">{escape(r["example"] or "")}</span>']
            for r in excluded], numeric=(1,))
    body += ("<p>To withhold something from the next publish, add a line to the rejects file "
             "(<code>curation.rejects_file</code>):</p><pre>kind,id,reason\npair,&lt;pair id&gt;,instruction names "
             "the wrong object\nimage,&lt;image id&gt;,watermark</pre><p class=dim>A rejected image withholds every "
             "pair it is the query or target of; as a hard negative it is replaced by another image from the "
             "query's retrieved set.</p>")
    return section_frame("curation", "Curation", body)


_COMPARED = (
    ("inputs seen", ("images_in",), fmt_int), ("quarantine rate", ("quarantine_rate",), fmt_pct),
    ("mined pairs", ("pairs",), fmt_int), ("annotated", ("annotated",), fmt_int),
    ("annotation failure rate", ("failure_rate",), fmt_pct),
    ("withheld by curators", ("excluded_by_curators",), fmt_int), ("published triplets", ("published",), fmt_int),
    ("instructions per triplet", ("instructions", "mean_per_pair"), fmt_num),
    ("words per instruction", ("instructions", "mean_words"), lambda x: fmt_num(x, 1)),
    ("vocabulary", ("instructions", "vocabulary"), fmt_int),
    ("distinct-2", ("instructions", "distinct_2"), lambda x: fmt_num(x, 3)),
    ("top instruction share", ("instructions", "instruction_share"), fmt_pct),
    ("top opening share", ("instructions", "opening_share"), fmt_pct),
)


def _dig(d: dict[str, Any] | None, keys: Sequence[str]) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def comparison_section(fig: dict[str, Any], prev: dict[str, Any] | None, names: Sequence[str]) -> str:
    if prev is None:
        return section_frame("comparison", "Comparison", '<p class="dim">No previous run to compare with '
                        "(<code>curation.compare_with</code>, or <code>megapairs report --previous RUN_DIR</code>).</p>")
    if "error" in prev:
        return section_frame("comparison", "Comparison", missing_note(f"previous run {prev['run_dir']} ({prev['error']})"))
    compared = list(_COMPARED) + [(f"candidates · {n}", ("candidates", n), fmt_int) for n in names]
    rows = []
    for label, keys, fmt in compared:
        now, before = _dig(fig, keys), _dig(prev, keys)
        change = ""
        if isinstance(now, (int, float)) and isinstance(before, (int, float)):
            delta = now - before
            if fmt(now) == fmt(before):
                change = "±0"
            elif fmt is fmt_pct:  # rates change in percentage points
                change = f"{100 * delta:+.1f} pp"
            else:
                change = ("+" if delta > 0 else "−") + fmt(abs(delta)) + (f" ({delta / before:+.1%})" if before else "")
        rows.append([escape(label), fmt(now), fmt(before), change])
    head = f"this run <code>{escape(str(fig['run_id']))}</code>"
    prev_head = f"previous <code>{escape(str(prev.get('run_id')))}</code>"
    intro = f"Against <code>{escape(str(prev.get('run_dir')))}</code>."
    return section_frame("comparison", "Comparison", html_table(["", head, prev_head, "change"], rows, numeric=(1, 2, 3)), intro)
