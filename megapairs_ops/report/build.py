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

import time
from typing import Any

from megapairs_ops.config import PipelineConfig
from megapairs_ops.db import session_settings
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import atomic_path, clear_dir, sweep_temps, write_json

from .figures import (
    ReportDb,
    collect_figures,
    find_previous_run,
    previous_figures,
    read_combinations,
    read_instructions,
    read_problems,
    read_similarity,
    triplet_source,
)
from .gallery import gallery_section, make_thumbs, pick_gallery
from .html import page_html
from .review import comparison_section, curation_section, instructions_section
from .sections import (
    banner_html,
    funnel_section,
    gates_section,
    overlap_section,
    overview_section,
    similarity_section,
)


def build_report(cfg: PipelineConfig, layout: RunLayout, previous: RunLayout | None = None) -> dict[str, Any]:
    """Build `reports/index.html` (and thumbnails, summary.json) for the run in `layout`.
    `previous` is the run to compare with; None looks it up by `curation.compare_with`
    (see `find_previous_run`). Works on unfinished and unpublished runs too."""
    from megapairs_ops.quality.gates import load_gate_results
    from megapairs_ops.stages.publish.triplets import run_config_path, write_run_config

    t0 = time.perf_counter()
    if not layout.root.is_dir():
        raise FileNotFoundError(f"run directory {layout.root} does not exist")
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    # What a killed report left: its temp files and folders, and DuckDB's spill files.
    for path in (layout.report_index, layout.thumbs_dir, layout.report_summary, layout.stats):
        sweep_temps(path)
    clear_dir(layout.spill_dir("report"))
    if not run_config_path(layout).is_file():  # publish records the run's own; keep that one
        write_run_config(cfg, layout)
    previous = previous if previous is not None else find_previous_run(cfg, layout)
    settings = session_settings(cfg, layout, "report")
    names = [e.name for e in cfg.encoders]
    parts, source = triplet_source(layout)
    db = ReportDb(settings)
    try:
        quarantine = read_problems(db, layout.quarantine_dir)
        failures = read_problems(db, layout.failures_dir)
        sims = {n: read_similarity(db, layout, n) for n in names}
        combos = read_combinations(db, [layout.pairs])
        published = read_combinations(db, parts) if source == "published" else []
        instr = read_instructions(layout, parts, settings)
        fig = collect_figures(layout, names, settings, _db=db, _instr=instr)
        picked = pick_gallery(db, cfg, layout, parts)
    finally:
        db.close()
    sizes = make_thumbs(picked, layout, cfg.ingest.max_pixels)
    suites = load_gate_results(layout)
    prev = previous_figures(previous, settings)
    body = "".join([
        overview_section(fig, cfg),
        gates_section(suites, layout),
        funnel_section(cfg, layout, fig, quarantine, failures),
        similarity_section(cfg, sims),
        overlap_section(cfg, combos, published),
        instructions_section(instr, source, cfg),
        gallery_section(cfg, picked, sizes, source),
        curation_section(cfg, layout, failures),
        comparison_section(fig, prev, names),
    ])
    write_json(fig, layout.report_summary)
    index = layout.report_index
    with atomic_path(index) as tmp:
        tmp.write_text(page_html(cfg, fig, banner_html(fig, suites), body), encoding="utf-8")
    return {
        "report": str(index),
        "state": source,
        "gallery": len(picked),
        "thumbnails": len(sizes),
        "previous": str(previous.root) if previous else None,
        "gates": fig["gates"],
        "seconds_report": round(time.perf_counter() - t0, 3),
    }
