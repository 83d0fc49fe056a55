"""The curation loop: curators list what must not ship, the next publish leaves it out.

The list is a CSV (`curation.rejects_file`) with a header naming at least `kind` and `id`:

    kind,id,reason
    pair,0f3a9c2b7d1e4a55,instruction names the wrong object
    image,4d7c3fff3428cfa6,watermark

`kind` is `pair` (a pair_id) or `image` (an image_id, or the image's full sha256); `reason` is
free text and may be empty; other columns (curator, date, ...) are kept out of the way; blank
lines and lines whose first cell starts with `#` are skipped. A malformed line stops the publish
with a one-line error naming file and line: a rejection that is silently ignored would ship what
the curator rejected.

What a listed image does:
- as the query or the target of an annotated pair, the pair is withheld;
- as one of a pair's hard negatives, the negative is replaced by another eligible image from the
  query's retrieved set, drawn the way the pairs stage draws negatives (seeded); the pair is
  withheld only when too few eligible images remain (`curation.rejected_negatives: drop` withholds
  every such pair instead). A negative is a retrieval distractor, so one bad negative should not
  cost a triplet that is otherwise good, and a popular image can be a negative of many pairs.

Withheld pairs are rows of the run's failures table (stage `curation`, reason
`rejected_pair` / `rejected_query_image` / `rejected_target_image` / `rejected_negative_image` /
`rejected_negative_without_replacement`, the curator's reason and file line in `detail`), so
"what did not ship and why" stays one table. Ids the run does not contain are counted, not errors:
a rejects list accumulates across runs.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from megapairs_ops.config import ConfigError, PipelineConfig
from megapairs_ops.db import sql
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import FAILURE_SCHEMA, REJECT_SCHEMA
from megapairs_ops.storage import write_problem_rows

STAGE = "curation"
KINDS = ("pair", "image")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CurationError(ConfigError):
    """The rejects file cannot be read as the curator meant it; one line, naming file and line."""


def rejects_path(cfg: PipelineConfig) -> Path | None:
    path = cfg.curation.rejects_file
    return Path(path).expanduser().resolve() if path else None


def load_rejects(path: Path) -> pa.Table:
    """The rejects file as rows (kind, id, reason, line); image sha256s become image ids, and a
    repeated (kind, id) keeps its first line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CurationError(f"{path}: curation.rejects_file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CurationError(f"{path}: cannot read the rejects file ({exc})") from None
    lines = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), start=1)
             if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")]
    if not lines:
        return REJECT_SCHEMA.empty_table()
    header_line, header = lines[0]
    columns = [c.strip().lower() for c in header]
    missing = [c for c in ("kind", "id") if c not in columns]
    if missing:
        raise CurationError(
            f"{path}:{header_line}: header must name columns kind and id (and optionally reason); "
            f"missing {', '.join(missing)}")
    at = {c: columns.index(c) for c in ("kind", "id", "reason") if c in columns}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for n, row in lines[1:]:
        cells = [c.strip() for c in row] + [""] * len(columns)
        kind, ident = cells[at["kind"]].lower(), cells[at["id"]].lower()
        reason = cells[at["reason"]] if "reason" in at else ""
        if kind not in KINDS:
            raise CurationError(f"{path}:{n}: kind must be 'pair' or 'image', got {kind!r}")
        if kind == "image" and _HEX64.match(ident):
            ident = ident[:16]
        if not _HEX16.match(ident):
            what = "a 16-hex pair_id" if kind == "pair" else "a 16-hex image_id or a 64-hex sha256"
            raise CurationError(f"{path}:{n}: id must be {what}, got {ident!r}")
        rows.setdefault((kind, ident), {"kind": kind, "id": ident, "reason": reason, "line": n})
    return pa.Table.from_pylist(list(rows.values()), schema=REJECT_SCHEMA)


def rejects_fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    """What the publish stage's fingerprint must include so that editing the rejects file (not
    only the config) re-publishes."""
    path = rejects_path(cfg)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path and path.is_file() else None
    return {"rejects_file": str(path) if path else None, "rejects_sha256": digest,
            "rejected_negatives": cfg.curation.rejected_negatives}


def apply_curation(con: Any, cfg: PipelineConfig, layout: RunLayout) -> dict[str, Any]:
    """Create the temp tables the publish SQL reads (`curation_exclusions`, `replaced_negatives`)
    on DuckDB connection `con`, write the exclusions as the `curation` failures part and return
    the curation stats."""
    path = rejects_path(cfg)
    rejects = load_rejects(path) if path else REJECT_SCHEMA.empty_table()
    kinds = rejects.column("kind").to_pylist()
    pick = lambda kind: rejects.filter(pa.array([k == kind for k in kinds], pa.bool_()))  # noqa: E731
    pairs_t, images_t = pick("pair"), pick("image")
    con.register("rejected_pairs_table", pa.table({
        "pair_id": pairs_t.column("id"), "reason": pairs_t.column("reason"), "line": pairs_t.column("line")}))
    con.register("rejected_images_table", pa.table({
        "image_id": images_t.column("id"), "reason": images_t.column("reason"), "line": images_t.column("line")}))
    con.execute(sql("curation_load_rejects"))

    base = {"pairs": str(layout.pairs), "annotations": str(layout.annotations)}
    if rejects.num_rows:
        con.execute(sql("curation_exclusions"), {
            **base, "source": path.name if path else "",
            "drop_negatives": cfg.curation.rejected_negatives == "drop"})
        con.execute(sql("curation_negatives_to_replace"), base)
        # The retrieved sets replacements come from; without them every such pair is withheld.
        present = [e for e in cfg.encoders if layout.neighbours(e.name).is_file()]
        neighbours = [str(layout.neighbours(e.name)) for e in present]
        con.register("encoder_files", pa.table({
            "encoder": [e.name for e in present], "path": pa.array(neighbours, pa.string()),
            "hi": pa.array([e.band[1] for e in present], pa.float64())}))
        if neighbours:
            con.execute(sql("curation_replacement_negatives"), {
                "images": str(layout.images), "neighbours": neighbours, "seed": str(cfg.seed),
                "max_hamming": cfg.pairs.near_duplicate_hamming})
        else:
            con.execute(sql("curation_no_replacements"))
        con.execute(sql("curation_unreplaceable"))
        unmatched_pairs, unmatched_images = con.execute(
            sql("curation_unmatched_rejects"), {"pairs": base["pairs"], "images": str(layout.images)}
        ).fetchall()[0]
    else:
        con.execute(sql("curation_no_exclusions"))
        unmatched_pairs = unmatched_images = 0

    replaced, pairs_replaced = con.execute(sql("curation_replaced_counts")).fetchall()[0]
    excluded = con.sql(sql("curation_excluded_pairs")).to_arrow_table()
    rows = [dict(r, stage=STAGE, attempts=0) for r in excluded.to_pylist()]
    # Always written, so a publish after the list was emptied drops the old exclusions.
    write_problem_rows(rows, FAILURE_SCHEMA, layout.failures_part(STAGE))
    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    return {
        "rejects_file": str(path) if path else None,
        "rejected_pairs": pairs_t.num_rows,
        "rejected_images": images_t.num_rows,
        "unmatched_pair_ids": int(unmatched_pairs),
        "unmatched_image_ids": int(unmatched_images),
        "excluded": len(rows),
        "excluded_by_reason": dict(sorted(by_reason.items())),
        "negatives_replaced": int(replaced),
        "pairs_with_replaced_negatives": int(pairs_replaced),
    }
