"""Reusing what was published: a run over a grown corpus asks the catalogue which of its pairs
were already published with the same annotators and prompt version, and carries those
annotations over instead of paying the models again, provided they still pass today's checks
(those that do not are asked again, and never published again as they were)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megapairs_ops.config import PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import ANNOTATION_SCHEMA
from megapairs_ops.stages.annotate.checks import TextRules, check_annotation
from megapairs_ops.storage import write_parquet

REUSED_FILE = "reused.parquet"
TODO_PAIRS_FILE = "pairs.parquet"


def split_for_reuse(cfg: PipelineConfig, layout: RunLayout, into: Path) -> dict[str, Any]:
    """Split the run's pairs into those the catalogue answers (written to `into`/reused.parquet)
    and those to annotate (`into`/pairs.parquet, or the run's own pairs.parquet when nothing is
    reused). Returns what the plan records: {pairs, reused, pairs_in, pairs_to_annotate,
    reuse_failed_checks}."""
    from megapairs_ops.stages.publish.catalogue import reusable_annotations

    reused, rechecked_out = passing_current_checks(cfg, reusable_annotations(cfg, layout, ANNOTATION_SCHEMA))
    pairs_in = pq.ParquetFile(layout.pairs).metadata.num_rows
    if reused.num_rows == 0:
        return {"pairs": str(layout.pairs), "reused": 0, "pairs_in": pairs_in, "pairs_to_annotate": pairs_in,
                "reuse_failed_checks": rechecked_out}
    pairs = pq.read_table(layout.pairs)
    todo = pairs.filter(pc.invert(pc.is_in(pairs.column("pair_id"), value_set=reused.column("pair_id"))))
    write_parquet(todo, into / TODO_PAIRS_FILE)
    write_parquet(reused, into / REUSED_FILE)
    return {"pairs": str(into / TODO_PAIRS_FILE), "reused": reused.num_rows, "pairs_in": pairs.num_rows,
            "pairs_to_annotate": todo.num_rows, "reuse_failed_checks": rechecked_out}


def passing_current_checks(cfg: PipelineConfig, annotations: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """The published annotations that still pass the current output checks, and how many did not,
    by reason."""
    rules = TextRules.from_config(cfg.annotate.checks)
    columns = (annotations.column(c).to_pylist() for c in ("description", "instructions", "word_num"))
    reasons = [check_annotation(d, i or [], w or 0, cfg.annotate, rules) for d, i, w in zip(*columns)]
    failed = Counter(r for r in reasons if r)
    if not failed:
        return annotations, {}
    return annotations.filter(pa.array([not r for r in reasons])), dict(sorted(failed.items()))
