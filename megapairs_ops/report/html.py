"""Page building blocks: number formats, tables, KPI tiles, section frames, badges, the CSS and
the page itself. Everything is escaped here or by the caller; nothing is fetched at view time."""

from __future__ import annotations

from html import escape
from typing import Any, Iterator, Sequence

from megapairs_ops.config import PipelineConfig

from . import charts

SECTIONS = (
    ("overview", "Overview"), ("gates", "Gates"), ("funnel", "Funnel"), ("similarity", "Similarity"),
    ("overlap", "Encoder overlap"), ("instructions", "Instructions"), ("gallery", "Gallery"),
    ("curation", "Curation"), ("comparison", "Comparison"),
)


fmt_int = charts.fmt_int


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def encoder_colour(cfg_names: Sequence[str], name: str) -> str:
    return charts.PALETTE[cfg_names.index(name) % len(charts.PALETTE)] if name in cfg_names else charts.MUTED


def html_table(header: Sequence[str], rows: Iterator[Sequence[str]] | Sequence[Sequence[str]],
           numeric: Sequence[int] = (), cls: str = "") -> str:
    """Cells are HTML already (escape text before)."""
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{h}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def kpi_tile(value: str, label: str, note: str = "", tone: str = "") -> str:
    return (f'<div class="kpi {tone}"><div class="kpi-value">{value}</div><div class="kpi-label">{escape(label)}</div>'
            + (f'<div class="kpi-note">{note}</div>' if note else "") + "</div>")


def section_frame(key: str, title: str, body: str, intro: str = "") -> str:
    return (f'<section id="{key}"><h2>{escape(title)}</h2>'
            + (f'<p class="intro">{intro}</p>' if intro else "") + body + "</section>")


def missing_note(what: str) -> str:
    return f'<p class="missing">Not available: {escape(what)}.</p>'


def status_badge(status: str) -> str:
    return f'<span class="badge {escape(status)}">{escape(status)}</span>'


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


def page_html(cfg: PipelineConfig, fig: dict[str, Any], banner: str, body: str) -> str:
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
