"""What an answer is worth: the records a pair's steps left, judged against today's checks.

A pair is done (both steps accepted and still passing every check), failed (its last try
failed and no more tries are due in this execution), or still to do (never asked, or failed
in an earlier execution with tries left under `max_attempts_across_runs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from megapairs_ops.config import PipelineConfig, StepConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.stages.annotate.backends import step_identity
from megapairs_ops.stages.annotate.checks import (
    TextRules,
    check_answer,
    check_description,
    check_instructions,
    offending_text,
    word_count,
)
from megapairs_ops.stages.annotate.parsing import parse_instructions
from megapairs_ops.stages.annotate.prompts import PROMPTS_ROOT, draw_demo_indices, draw_word_num, load_prompt_set, seed_key
from megapairs_ops.stages.annotate.records import RecordStore

STAGE = "annotate"
RECORD_FORMAT = "r1"  # bump when records change meaning: old ones are then not reused
DETAIL_CHARS = 400


def snippet(text: str | None) -> str:
    return repr((text or "")[:160])


def _rejected_detail(step: str, reason: str, text: str | None, rules: TextRules, what: str) -> str:
    """A failure detail a curator can act on: which check, what it saw, the start of the output."""
    found = offending_text(text, rules) if reason in ("template_token", "meta_language") else ""
    seen = f"{reason} {found!r}" if found else reason
    return f"{step}: {seen}; {what}; output {snippet(text)}"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _prompt_digest(version: str) -> str:
    h = hashlib.sha256()
    for path in sorted((PROMPTS_ROOT / version).glob("*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def sampling(step: StepConfig, seed: int | None) -> str:
    return json.dumps(
        {"temperature": step.temperature, "top_p": step.top_p, "max_tokens": step.max_tokens, "seed": seed},
        sort_keys=True,
    )


@dataclass
class Pair:
    pair_id: str
    q_id: str
    t_id: str
    q_path: str | None = None
    q_caption: str = ""
    t_path: str | None = None
    t_caption: str = ""
    key: str = ""
    word_num: int = 0
    demo_ids: list[int] = field(default_factory=list)

    @property
    def missing_images(self) -> list[str]:
        return [i for i, p in ((self.q_id, self.q_path), (self.t_id, self.t_path)) if p is None]


@dataclass
class Todo:
    pair: Pair
    describe: dict[str, Any] | None  # the record to start from (None: never tried)
    instruct: dict[str, Any] | None
    start_at: str  # "describe" | "instruct"


class Answers:
    """What the stage knows about answers, derived from the config: prompts, record keys, the
    checks, the retry budget, and which execution of the stage is under way (`execution`, the
    work dir plan's id: failures recorded by it are final for it)."""

    def __init__(self, cfg: PipelineConfig, layout: RunLayout, execution: str = "") -> None:
        self.cfg = cfg
        self.layout = layout
        self.acfg = acfg = cfg.annotate
        self.prompts = load_prompt_set(acfg.prompt_version)
        self.execution = execution
        self.namespace = cfg.section_fingerprint(
            "annotate-records",
            RECORD_FORMAT,
            cfg.seed,
            list(acfg.word_num),
            acfg.n_demos,
            acfg.prompt_version,
            _prompt_digest(acfg.prompt_version),
        )
        self.store = RecordStore(layout.annotation_records / self.namespace)
        self.identity = {"describe": step_identity(acfg.describe), "instruct": step_identity(acfg.instruct)}
        self.rules = TextRules.from_config(acfg.checks)
        self.cap = acfg.max_attempts_across_runs

    # -- keys and checks ---------------------------------------------------------------------
    def record(self, records: dict, pair_id: str, step: str) -> dict[str, Any] | None:
        return records.get((pair_id, step, self.prompts.version, self.identity[step][1]))

    def prepare(self, pair: Pair) -> None:
        pair.key = seed_key(self.cfg.seed, pair.pair_id)
        pair.word_num = draw_word_num(*self.acfg.word_num, pair.key)
        pair.demo_ids = draw_demo_indices(len(self.prompts.demos), self.acfg.n_demos, pair.key)

    def describe_verdict(self, rec: dict | None, pair: Pair) -> tuple[bool, str, str]:
        """(usable, reason, detail) of a describe record under the current checks."""
        if rec is None:
            return False, "not_annotated", ""
        if rec["status"] != "accepted":
            return False, rec["reason"], rec["detail"]
        return self.check_description(rec["text"] or "", pair)

    def check_description(self, text: str, pair: Pair) -> tuple[bool, str, str]:
        ok, reason = check_description(text, pair.word_num, self.acfg.word_num_tolerance, self.rules)
        if not ok:
            what = f"{word_count(text)} words for word_num={pair.word_num}"
            return False, reason, _rejected_detail("describe", reason, text, self.rules, what)
        return True, "", ""

    def check_instruct_answer(
        self, text: str | None, description: str, instructions: list[str] | None = None
    ) -> tuple[bool, str, str, list[str]]:
        """(usable, reason, detail, instructions) of an instruct answer: the raw text, then the
        instructions parsed from it (or those a record keeps: they are what gets published)."""
        reason = check_answer(text, self.rules)
        if instructions is None:
            instructions = [] if reason else parse_instructions(text)
        if not reason:
            ok, reason = check_instructions(
                instructions, description, self.acfg.min_instructions, self.acfg.max_instruction_chars, self.rules
            )
            if ok:
                return True, "", "", instructions
        what = f"{len(instructions)} parsed"
        return False, reason, _rejected_detail("instruct", reason, text, self.rules, what), instructions

    def instruct_verdict(self, rec: dict | None, description: str) -> tuple[bool, str, str]:
        if rec is None or rec["input_digest"] != digest(description):
            return False, "not_annotated", ""
        if rec["status"] != "accepted":
            return False, rec["reason"], rec["detail"]
        ok, reason, detail, _ = self.check_instruct_answer(rec["text"], description, list(rec["instructions"] or []))
        return ok, reason, detail

    def settled(self, rec: dict, used: int, final: bool) -> bool:
        """Whether a record that is not a usable output stands as the pair's failure: after this
        run, once the cap is spent, within the execution that wrote it, or when asking again
        cannot help."""
        return final or not self.retryable(rec, used) or rec.get("execution") == self.execution

    def retryable(self, rec: dict, used: int) -> bool:
        """Whether the next stage execution would ask again for a failed step."""
        return rec.get("retryable") is not False and used < self.cap

    def used(self, rec: dict | None, input_digest: str | None = None) -> int:
        if rec is None or (input_digest is not None and rec["input_digest"] != input_digest):
            return 0
        return int(rec["attempts"])

    def classify(self, pair: Pair, records: dict, final: bool = False) -> tuple[str, Any]:
        """("done", accepted row) | ("failed", failure row) | ("todo", Todo). Before a run a
        failure with tries left is "todo"; after it (`final`), it is this run's failure."""
        if pair.missing_images:
            detail = f"not in images.parquet: {', '.join(pair.missing_images)}"
            return "failed", failure(pair, "image_missing", detail, 0, retryable=False)
        d = self.record(records, pair.pair_id, "describe")
        ok, reason, detail = self.describe_verdict(d, pair)
        if not ok:
            if d is not None and self.settled(d, self.used(d), final):
                return "failed", failure(pair, reason, detail, self.used(d), self.retryable(d, self.used(d)))
            return "todo", Todo(pair, d, None, "describe")
        description = (d["text"] or "").strip()
        i = self.record(records, pair.pair_id, "instruct")
        ok, reason, detail = self.instruct_verdict(i, description)
        if not ok:
            used = self.used(i, digest(description))
            if i is not None and used and self.settled(i, used, final):
                return "failed", failure(pair, reason, detail, used, self.retryable(i, used))
            return "todo", Todo(pair, d, i, "instruct")
        return "done", self.accepted_row(pair, d, i)

    def accepted_row(self, pair: Pair, d: dict, i: dict) -> dict[str, Any]:
        return {
            "pair_id": pair.pair_id,
            "description": (d["text"] or "").strip(),
            "instructions": list(i["instructions"]),
            "word_num": pair.word_num,
            "describe_backend": d["backend"],
            "describe_model": d["served_model"],
            "instruct_backend": i["backend"],
            "instruct_model": i["served_model"],
            "prompt_version": self.prompts.version,
            "attempts": max(d["attempts"], i["attempts"]),
            "describe_attempts": d["attempts"],
            "instruct_attempts": i["attempts"],
            "describe_seed": d["seed"],
            "instruct_seed": i["seed"],
            "describe_sampling": d["sampling"],
            "instruct_sampling": i["sampling"],
            "demo_ids": pair.demo_ids,
        }


def failure(pair: Pair, reason: str, detail: str, attempts: int, retryable: bool) -> dict[str, Any]:
    return {
        "retryable": retryable,  # not a FAILURE_SCHEMA column: counted, not written
        "pair_id": pair.pair_id,
        "q_id": pair.q_id,
        "t_id": pair.t_id,
        "stage": STAGE,
        "reason": reason,
        "detail": (detail or "")[:DETAIL_CHARS],
        "attempts": attempts,
    }
