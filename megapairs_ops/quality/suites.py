"""The four suites, one per gate a stage declares: what each reads from the run directory, the
helper columns it derives and the rules it checks. SUITES maps a suite to its builder and to the
schema (schemas.py) its artifact must have."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megapairs_ops import schemas
from megapairs_ops.config import PipelineConfig
from megapairs_ops.db import session_settings
from megapairs_ops.errors import GateFailed
from megapairs_ops.layout import RunLayout

from .columns import (
    blank_counts,
    combined,
    constant,
    contains,
    derive,
    distinct_counts,
    first_items,
    group_sizes,
    lengths,
    pair_ids,
    parents,
    row_counts,
    sims_in_band,
    strip_lists,
    to_pandas,
    with_helpers,
)
from .rules import (
    HEX16,
    HEX64,
    Batch,
    Rule,
    between,
    configured_gate,
    equals,
    file_rows,
    min_rows,
    not_equal,
    not_null,
    regex,
    schema_rules,
    top_counts,
    unique,
)

log = logging.getLogger(__name__)


def _columns(schema: pa.Schema) -> dict[str, pa.DataType]:
    return {f.name: f.type for f in schema}


IMAGES_SCHEMA = _columns(schemas.IMAGES_SCHEMA)
CANDIDATES_SCHEMA = _columns(schemas.CANDIDATE_SCHEMA)
PAIRS_SCHEMA = _columns(schemas.PAIRS_SCHEMA)
TRIPLETS_SCHEMA = _columns(schemas.TRIPLET_SCHEMA)


class ValidationFailed(GateFailed):
    """A stage's output broke its suite; the message is one line meant for the task log."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps `result` when the exception crosses a process boundary (executors pickle it).
        return type(self), (str(self), self.result)


def suite_name(suite: str, encoder: str | None = None) -> str:
    return f"megapairs_{suite}" + (f"_{encoder}" if encoder else "")


def _read(path: Path, what: str) -> pa.Table:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found at {path}; run the stage that writes it first")
    return pq.read_table(path)


def ingest_batch(cfg: PipelineConfig, layout: RunLayout) -> Batch:
    table = _read(layout.images, "ingest output")
    helpers = {"sha256_prefix": lambda t: pc.utf8_slice_codeunits(combined(t, "sha256"), 0, 16)}
    table = derive(table, helpers)
    rules, type_helpers = schema_rules(table, IMAGES_SCHEMA)
    m = cfg.ingest.min_side
    rules += [
        min_rows("has_usable_images", "no usable images: ingest kept zero rows"),
        *not_null("image_id", "sha256", "path", "caption"),
        unique("image_id_unique", "image_id"),
        regex("image_id_16_hex", "image_id", HEX16, "image_id is 16 lowercase hex chars"),
        regex("sha256_64_hex", "sha256", HEX64, "sha256 is 64 lowercase hex chars"),
        Rule("image_id_is_sha256_prefix", "ExpectColumnPairValuesToBeEqual",
             {"column_A": "image_id", "column_B": "sha256_prefix"},
             "image_id is the first 16 chars of sha256"),
        regex("caption_not_blank", "caption", r"\S", "caption has a non-space character"),
        between("width_min_side", "width", f"width >= ingest.min_side ({m})", min_value=m),
        between("height_min_side", "height", f"height >= ingest.min_side ({m})", min_value=m),
        between("file_bytes_positive", "file_bytes", "file_bytes > 0", min_value=1),
    ]
    gate_rules, gates, figures = _ingest_gates(cfg, layout, table)
    table = with_helpers(table, figures)
    return Batch(to_pandas(with_helpers(table, type_helpers)), rules + gate_rules, gates=gates)


def _ingest_gates(
    cfg: PipelineConfig, layout: RunLayout, table: pa.Table
) -> tuple[list[Rule], list[dict[str, Any]], dict[str, Any]]:
    """Quarantine and exact-duplicate rates over every input ingest saw (usable images, the
    copies collapsed into them, and the quarantined inputs)."""
    n = table.num_rows
    try:
        duplicates = int(lengths(combined(table, "duplicate_paths")).sum())
    except (KeyError, pa.ArrowException):
        duplicates = 0
    quarantine = layout.quarantine_part("ingest")
    quarantined = file_rows(quarantine)
    items = n + duplicates + quarantined
    rates = {
        "quarantine_rate": quarantined / items if items else None,
        "duplicate_rate": duplicates / items if items else None,
    }
    details = {
        "quarantine_rate": f"{quarantined} of {items} inputs quarantined"
        + (f" ({top_counts(quarantine, 'reason')})" if quarantined else ""),
        "duplicate_rate": f"{duplicates} of {items} inputs were exact copies of another",
    }
    whats = {"quarantine_rate": "share of inputs quarantined",
             "duplicate_rate": "share of inputs that are exact duplicates"}
    rules, gates = [], []
    for key, value in rates.items():
        rule, record = configured_gate(cfg, key, key, whats[key], value, items, detail=details[key])
        rules += [rule] if rule else []
        gates.append(record)
    return rules, gates, {k: constant(v, n) for k, v in rates.items()}


def mining_batch(cfg: PipelineConfig, layout: RunLayout, encoder: str) -> Batch:
    enc = cfg.encoder(encoder)
    lo, hi = enc.band
    table = _read(layout.candidates(encoder), f"mining output for encoder '{encoder}'")
    table = derive(table, {
        "q_ne_t": not_equal("q_id", "t_id"),
        "targets_of_q": lambda t: group_sizes(combined(t, "q_id")),
    })
    rules, type_helpers = schema_rules(table, CANDIDATES_SCHEMA)
    k = cfg.mining.max_targets_per_query
    rules += [
        *not_null("q_id", "t_id", "sim", "rank"),
        equals("q_ne_t", "q_ne_t", True, "a query is never its own target"),
        between("sim_in_band", "sim", f"{lo} < sim < {hi} (band of encoder '{encoder}')",
                 min_value=lo, max_value=hi, strict_min=True, strict_max=True),
        between("rank_positive", "rank", "rank >= 1", min_value=1),
        between("max_targets_per_query", "targets_of_q",
                 f"at most mining.max_targets_per_query ({k}) rows per q_id", max_value=k),
        unique("q_t_unique", "q_id", "t_id"),
    ]
    warn = [f"no candidate pairs in band ({lo}, {hi}) for encoder '{encoder}'"]
    warn = warn if not table.num_rows else []
    return Batch(to_pandas(with_helpers(table, type_helpers)), rules, warn)


def pairs_batch(cfg: PipelineConfig, layout: RunLayout) -> Batch:
    table = _read(layout.pairs, "pairs output")
    table = derive(table, {
        "expected_pair_id": pair_ids,
        "q_ne_t": not_equal("q_id", "t_id"),
        "n_hns": lambda t: lengths(combined(t, "hn_ids")),
        "t_in_hns": lambda t: contains(combined(t, "hn_ids"), combined(t, "t_id")),
        "q_in_hns": lambda t: contains(combined(t, "hn_ids"), combined(t, "q_id")),
        "n_encoders": lambda t: lengths(combined(t, "encoders")),
        "sims_in_band": lambda t: sims_in_band(
            combined(t, "encoders"), combined(t, "sims"), cfg),
    })
    rules, type_helpers = schema_rules(table, PAIRS_SCHEMA)
    n = cfg.mining.n_hard_negatives
    rules += [
        *not_null("pair_id", "q_id", "t_id"),
        unique("pair_id_unique", "pair_id"),
        Rule("pair_id_from_ids", "ExpectColumnPairValuesToBeEqual",
             {"column_A": "pair_id", "column_B": "expected_pair_id"},
             "pair_id == sha256(f'{q_id}:{t_id}')[:16]"),
        unique("q_t_unique", "q_id", "t_id"),
        equals("q_ne_t", "q_ne_t", True, "a query is never its own target"),
        between("hn_count", "n_hns", f"len(hn_ids) == mining.n_hard_negatives ({n})",
                 min_value=n, max_value=n),
        equals("t_not_in_hns", "t_in_hns", False, "the target is never a hard negative"),
        equals("q_not_in_hns", "q_in_hns", False, "the query is never a hard negative"),
        between("encoders_non_empty", "n_encoders", "at least one encoder found the pair",
                 min_value=1),
        equals("sims_in_band", "sims_in_band", True,
            "every sims[j] is strictly inside the band of encoders[j]"),
    ]
    warn = [] if table.num_rows else ["pairs table is empty: no pair survived mining and dedup"]
    gate_rules, gates, found = _encoder_share_gates(cfg, table)
    table = with_helpers(table, found)
    return Batch(to_pandas(with_helpers(table, type_helpers)), rules + gate_rules, warn, gates)


def _encoder_share_gates(
    cfg: PipelineConfig, table: pa.Table
) -> tuple[list[Rule], list[dict[str, Any]], dict[str, Any]]:
    """Per encoder, the share of pairs it found: an encoder that silently stopped working
    (constant vectors, a wrong band) finds next to none."""
    n = table.num_rows
    try:
        encoders = combined(table, "encoders")
        item_rows, flat = parents(encoders), pc.list_flatten(encoders)
    except (KeyError, pa.ArrowException):
        return [], [], {}
    rules, gates, helpers = [], [], {}
    for enc in (e.name for e in cfg.encoders):
        hits = pc.fill_null(pc.equal(flat, enc), False).to_numpy(zero_copy_only=False)
        found = (row_counts(item_rows, hits, n) > 0).astype(np.float64)
        column = f"found_by__{enc}"
        helpers[column] = found
        share = float(found.mean()) if n else None
        rule, record = configured_gate(
            cfg, "encoder_share", column, f"share of pairs found by encoder '{enc}'", share, n,
            aggregate="mean", name=f"encoder_share_{enc}",
            detail=f"{int(found.sum())} of {n} pairs found by '{enc}'",
        )
        rules += [rule] if rule else []
        gates.append(record)
    return rules, gates, helpers


def _read_triplets(layout: RunLayout) -> pa.Table:
    parts = sorted(Path(layout.triplets_dir).glob("part-*.parquet"))
    if not parts:
        return pa.schema(list(TRIPLETS_SCHEMA.items())).empty_table()
    # The whole release is loaded because the uniqueness rules span parts, and every column
    # because the schema rules cover them all; the pandas frame shares the Arrow buffers, so
    # peak memory is about the release's Arrow size. Tens of millions of rows want a streaming
    # pass instead: row rules per part, uniqueness on the key columns only.
    tables = [pq.read_table(p) for p in parts]
    try:
        # Permissive: a part with a wider type (list<double> for sims) is reported by the type
        # rules instead of failing the read.
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        odd = next(p.name for p, t in zip(parts, tables) if not t.schema.equals(tables[0].schema))
        raise ValidationFailed(
            f"triplets validation failed: part files have incompatible schemas ({odd} differs "
            f"from {parts[0].name}: {str(exc).splitlines()[0]})",
            {"suite": suite_name("triplets"), "success": False,
             "failed_expectations": ["part_schemas_compatible"]},
        ) from None


def triplets_batch(cfg: PipelineConfig, layout: RunLayout) -> Batch:
    table = _read_triplets(layout)
    figures = _instruction_figures(cfg, layout, table)
    failed, attempted = _annotate_outcomes(layout)
    failure_rate = failed / attempted if attempted else None
    helpers = {
        "q_ne_t_img": not_equal("q_img", "t_img"),
        "hns0_is_q": lambda t: pc.fill_null(
            pc.equal(first_items(combined(t, "hns")), combined(t, "q_img")), False),
        "t_in_hns": lambda t: contains(combined(t, "hns"), combined(t, "t_img")),
        "n_hns": lambda t: lengths(combined(t, "hns")),
        "n_instructions": lambda t: lengths(combined(t, "q_text")),
        "n_distinct_instructions": lambda t: distinct_counts(
            strip_lists(combined(t, "q_text"))),
        "n_blank_instructions": lambda t: blank_counts(combined(t, "q_text")),
        "sims_in_band": lambda t: sims_in_band(
            combined(t, "encoders"), combined(t, "sims"), cfg),
        "text_check": lambda t: _text_checks(t, cfg),
        # gate figures; left out (and their rules fail naming them) when q_text is unusable
        "instruction_share": lambda t: figures["instruction_share_per_row"],
        "opening_share": lambda t: figures["opening_share_per_row"],
        "distinct_2gram_ratio": lambda t: constant(figures["distinct_2"], t.num_rows),
        "failure_rate": lambda t: constant(failure_rate, t.num_rows),
    }
    table = derive(table, helpers)
    rules, type_helpers = schema_rules(table, TRIPLETS_SCHEMA, exact_with=list(helpers))
    n, m = cfg.mining.n_hard_negatives, cfg.annotate.min_instructions
    w_lo, w_hi = cfg.annotate.word_num
    rules += [
        min_rows("has_triplets", "nothing to publish: zero triplets"),
        *not_null("q_img", "t_img", "pair_id", "run_id", "prompt_version"),
        equals("q_ne_t_img", "q_ne_t_img", True, "q_img != t_img"),
        equals("hns0_is_q_img", "hns0_is_q", True, "hns[0] == q_img"),
        equals("t_img_not_in_hns", "t_in_hns", False, "t_img is not among hns"),
        between("hns_count", "n_hns", f"len(hns) == mining.n_hard_negatives + 1 ({n + 1})",
                 min_value=n + 1, max_value=n + 1),
        between("min_instructions", "n_instructions",
                 f"len(q_text) >= annotate.min_instructions ({m})", min_value=m),
        between("min_distinct_instructions", "n_distinct_instructions",
                 f"at least {m} distinct instructions", min_value=m),
        between("no_blank_instructions", "n_blank_instructions",
                 "no instruction is blank", max_value=0),
        between("word_num_in_range", "word_num",
                 f"annotate.word_num range ({w_lo}..{w_hi})", min_value=w_lo, max_value=w_hi),
        equals("sims_in_band", "sims_in_band", True,
            "every sims[j] is strictly inside the band of encoders[j]"),
        equals("text_passes_output_checks", "text_check", "",
            "description and instructions pass annotate's output checks (unexpected values name the check)"),
        unique("q_t_img_unique", "q_img", "t_img"),
        unique("pair_id_unique", "pair_id"),
    ]
    n_rows = table.num_rows
    f = figures or {}
    top = (f.get("top_instructions") or [{}])[0]
    opening = (f.get("top_openings") or [{}])[0]
    specs = [
        ("mean_instructions", "n_instructions", "mean instructions per triplet",
         pc.mean(table.column("n_instructions")).as_py() if "n_instructions" in table.column_names else None,
         n_rows, "mean", ""),
        ("instruction_share", "instruction_share", "share of triplets holding the most common instruction",
         f.get("instruction_share"), n_rows, None,
         f"{top.get('instruction', '')!r} in {top.get('pairs', 0)} of {n_rows} triplets" if top else ""),
        ("opening_share", "opening_share", "share of instructions opening with the most common three words",
         f.get("opening_share"), n_rows, None,
         f"{opening.get('opening', '')!r} opens {opening.get('instructions', 0)} of "
         f"{f.get('instructions', 0)} instructions" if opening else ""),
        ("distinct_2gram_ratio", "distinct_2gram_ratio", "distinct word bigrams / all bigrams (sample)",
         f.get("distinct_2"), n_rows, None,
         f"on a seeded sample of {f.get('distinct_n_sample', 0)} instructions"),
        ("failure_rate", "failure_rate", "share of annotated pairs that failed annotation",
         failure_rate, attempted, None,
         f"{failed} of {attempted} pairs failed"
         + (f" ({top_counts(layout.failures_part('annotate'), 'reason')})" if failed else "")),
    ]
    gate_rules, gates = [], []
    for key, column, what, observed, rows, aggregate, detail in specs:
        rule, record = configured_gate(cfg, key, column, what, observed, rows, aggregate, detail=detail)
        gate_rules += [rule] if rule else []
        gates.append(record)
    return Batch(to_pandas(with_helpers(table, type_helpers)), rules + gate_rules, gates=gates)


def _text_checks(table: pa.Table, cfg: PipelineConfig) -> pa.Array:
    """Per triplet, the reason its text would fail annotate's output checks ('' when it passes):
    the last line of defence, so that no damaged answer is published whatever path it came by."""
    from megapairs_ops.stages.annotate.checks import TextRules, check_annotation

    rules = TextRules.from_config(cfg.annotate.checks)
    rows = zip(*(combined(table, c).to_pylist() for c in ("description", "q_text", "word_num")))
    return pa.array([check_annotation(d, q or [], w or 0, cfg.annotate, rules) for d, q, w in rows], pa.string())


def _instruction_figures(cfg: PipelineConfig, layout: RunLayout, table: pa.Table) -> dict[str, Any] | None:
    from megapairs_ops.quality.instruction_stats import instruction_stats

    try:
        return instruction_stats(table, per_row=True, top=1, settings=session_settings(cfg, layout, "publish"))
    except Exception as exc:  # a malformed q_text is the schema rules' to report, not a crash
        log.debug("instruction statistics unavailable: %s", exc)
        return None


def _annotate_outcomes(layout: RunLayout) -> tuple[int, int]:
    """(pairs that failed annotation, pairs annotation finished with: accepted + failed)."""
    failed = file_rows(layout.failures_part("annotate"))
    return failed, failed + file_rows(layout.annotations)


# suite -> (batch builder, the columns its artifact must have). "mining" runs per encoder.
SUITES: dict[str, tuple[Callable[..., Batch], dict[str, pa.DataType]]] = {
    "ingest": (ingest_batch, IMAGES_SCHEMA),
    "mining": (mining_batch, CANDIDATES_SCHEMA),
    "pairs": (pairs_batch, PAIRS_SCHEMA),
    "triplets": (triplets_batch, TRIPLETS_SCHEMA),
}
