"""The curator report: reports/index.html of a run, self-contained, opened straight from disk.

- figures.py: what the report shows, read from the run's artifacts (DuckDB, sql/report_*.sql);
- charts.py: inline SVG charts (histograms, bars);
- html.py: formats, tables, tiles, section frames, the CSS and the page;
- sections.py: pipeline health (banner, overview, gates, funnel, similarity, encoder overlap);
- review.py: what curators act on (instructions, curation, comparison with the previous run);
- gallery.py: the seeded gallery and its thumbnails;
- build.py: `build_report`, which puts them together and writes the page atomically.
"""

from megapairs_ops.report.build import build_report
from megapairs_ops.report.figures import collect_figures, find_previous_run, load_run_config

__all__ = ["build_report", "collect_figures", "find_previous_run", "load_run_config"]
