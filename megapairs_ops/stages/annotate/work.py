"""Annotate: for every mined pair, an MLLM description of what the two images share and how they
differ (WORD_NUM words), then >= 3 retrieval instructions from an LLM prompted with five
demonstrations out of a pool of fifty (MegaPairs section 3.1, appendix A).

Work is split by pair-id prefix (the first two hex digits) into work items that Airflow can map
over: `plan_annotate_work` lists them, `run_annotate_work` annotates one, `finalize_annotate`
merges them into annotations.parquet and the failures part; `annotate_pairs` does all three. A
work item that already finished in the stage execution under way (same pairs, images and
annotate config, no finalize since) is not run again: its outputs and stats stand, so a
finalizing call after mapped tasks neither asks a model nor loses the items' request stats.

Inside a work item every pair flows on its own through describe -> checks -> instruct ->
checks, so both endpoints stay busy; batch backends (local models) get the pairs in flight as
batches. Each finished (pair, step) outcome is checkpointed as a record keyed by (pair id, step,
prompt version, model) in small atomic parts (annotation/records.py). A killed task resumes
from its records; a re-run skips accepted outputs and retries failed ones until
`max_attempts_across_runs` tries were spent on them. Records live in a namespace of everything
that shapes the question (run seed, WORD_NUM range, number of demos, prompt files), so changing
those asks anew while changing endpoints or sampling settings reuses what was accepted.

Every random choice (word count, demonstrations, sampling seed) comes from a stable hash of
(run seed, pair id, attempt): a resumed run asks exactly what the uninterrupted one would have.
Accepted outputs are re-checked against the current checks whenever they are read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megapairs_ops.stages.annotate.backends import (
    STEPS,
    Backend,
    DescribeRequest,
    InstructRequest,
    Result,
    make_backend,
    run_async,
    step_identity,
)
from megapairs_ops.stages.annotate.checks import TextRules, check_answer, check_description, check_instructions, offending_text, word_count
from megapairs_ops.stages.annotate.parsing import parse_instructions
from megapairs_ops.stages.annotate.prompts import (
    PROMPTS_ROOT,
    draw_demo_indices,
    draw_word_num,
    load_prompt_set,
    seed_key,
)
from megapairs_ops.stages.annotate.records import RecordStore, RecordWriter, prefix_of, shard_name
from megapairs_ops.stages.annotate.request_stats import RequestStats
from megapairs_ops.config import PipelineConfig, StepConfig
from megapairs_ops.storage import FAILURE_SCHEMA, RunLayout, atomic_path, read_json, write_json, write_parquet

log = logging.getLogger(__name__)

STAGE = "annotate"
RECORD_FORMAT = "r1"  # bump when records change meaning: old ones are then not reused

# The contract's columns of annotations.parquet (other modules build tables of exactly these).
ANNOTATION_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("description", pa.string()),
        ("instructions", pa.list_(pa.string())),
        ("word_num", pa.int32()),
        ("describe_backend", pa.string()),
        ("describe_model", pa.string()),
        ("instruct_backend", pa.string()),
        ("instruct_model", pa.string()),
        ("prompt_version", pa.string()),
        ("attempts", pa.int32()),
    ]
)
# What annotations.parquet holds: the contract's columns, then how each output was sampled.
ANNOTATION_OUTPUT_SCHEMA = pa.schema(
    [
        *ANNOTATION_SCHEMA,
        ("describe_attempts", pa.int32()),
        ("instruct_attempts", pa.int32()),
        ("describe_seed", pa.int64()),
        ("instruct_seed", pa.int64()),
        ("describe_sampling", pa.string()),
        ("instruct_sampling", pa.string()),
        ("demo_ids", pa.list_(pa.int32())),
    ]
)

_DETAIL_CHARS = 400
_PROGRESS_EVERY_S = 60.0


def _snippet(text: str | None) -> str:
    return repr((text or "")[:160])


def _rejected_detail(step: str, reason: str, text: str | None, rules: TextRules, what: str) -> str:
    """A failure detail a curator can act on: which check, what it saw, the start of the output."""
    found = offending_text(text, rules) if reason in ("template_token", "meta_language") else ""
    seen = f"{reason} {found!r}" if found else reason
    return f"{step}: {seen}; {what}; output {_snippet(text)}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _prompt_digest(version: str) -> str:
    h = hashlib.sha256()
    for path in sorted((PROMPTS_ROOT / version).glob("*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _sampling(step: StepConfig, seed: int | None) -> str:
    return json.dumps(
        {"temperature": step.temperature, "top_p": step.top_p, "max_tokens": step.max_tokens, "seed": seed},
        sort_keys=True,
    )


@dataclass
class _Pair:
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
class _Todo:
    pair: _Pair
    describe: dict[str, Any] | None  # the record to start from (None: never tried)
    instruct: dict[str, Any] | None
    start_at: str  # "describe" | "instruct"


class _Context:
    """Everything a work item derives from the config: prompts, record keys, folders, checks."""

    def __init__(self, cfg: PipelineConfig, layout: RunLayout) -> None:
        self.cfg = cfg
        self.layout = layout
        self.acfg = acfg = cfg.annotate
        self.prompts = load_prompt_set(acfg.prompt_version)
        if acfg.n_demos > len(self.prompts.demos):
            raise ValueError(f"annotate.n_demos ({acfg.n_demos}) exceeds the demo pool ({len(self.prompts.demos)})")
        self.namespace = cfg.section_fingerprint(
            "annotate-records",
            RECORD_FORMAT,
            cfg.seed,
            list(acfg.word_num),
            acfg.n_demos,
            acfg.prompt_version,
            _prompt_digest(acfg.prompt_version),
        )
        self.store = RecordStore(layout.annotation_dir("records") / self.namespace)
        self.out_dir = layout.annotation_dir("out") / self.namespace
        self.stats_dir = layout.annotation_dir("stats") / self.namespace
        self.identity = {"describe": step_identity(acfg.describe), "instruct": step_identity(acfg.instruct)}
        self.rules = TextRules.from_config(acfg.checks)
        self.cap = acfg.max_attempts_across_runs
        self.generation = self.store.current_generation()

    # -- keys and checks ---------------------------------------------------------------------
    def record(self, records: dict, pair_id: str, step: str) -> dict[str, Any] | None:
        return records.get((pair_id, step, self.prompts.version, self.identity[step][1]))

    def prepare(self, pair: _Pair) -> None:
        pair.key = seed_key(self.cfg.seed, pair.pair_id)
        pair.word_num = draw_word_num(*self.acfg.word_num, pair.key)
        pair.demo_ids = draw_demo_indices(len(self.prompts.demos), self.acfg.n_demos, pair.key)

    def describe_verdict(self, rec: dict | None, pair: _Pair) -> tuple[bool, str, str]:
        """(usable, reason, detail) of a describe record under the current checks."""
        if rec is None:
            return False, "not_annotated", ""
        if rec["status"] != "accepted":
            return False, rec["reason"], rec["detail"]
        return self.check_description(rec["text"] or "", pair)

    def check_description(self, text: str, pair: _Pair) -> tuple[bool, str, str]:
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
        if rec is None or rec["input_digest"] != _digest(description):
            return False, "not_annotated", ""
        if rec["status"] != "accepted":
            return False, rec["reason"], rec["detail"]
        ok, reason, detail, _ = self.check_instruct_answer(rec["text"], description, list(rec["instructions"] or []))
        return ok, reason, detail

    def settled(self, rec: dict, used: int, final: bool) -> bool:
        """Whether a record that is not a usable output stands as the pair's failure: after this
        run, once the cap is spent, within the execution that wrote it, or when asking again
        cannot help."""
        return final or not self.retryable(rec, used) or rec["generation"] == self.generation

    def retryable(self, rec: dict, used: int) -> bool:
        """Whether the next stage execution would ask again for a failed step."""
        return rec.get("retryable") is not False and used < self.cap

    def used(self, rec: dict | None, input_digest: str | None = None) -> int:
        if rec is None or (input_digest is not None and rec["input_digest"] != input_digest):
            return 0
        return int(rec["attempts"])

    def classify(self, pair: _Pair, records: dict, final: bool = False) -> tuple[str, Any]:
        """("done", accepted row) | ("failed", failure row) | ("todo", _Todo). Before a run a
        failure with tries left is "todo"; after it (`final`), it is this run's failure."""
        if pair.missing_images:
            detail = f"not in images.parquet: {', '.join(pair.missing_images)}"
            return "failed", _failure(pair, "image_missing", detail, 0, retryable=False)
        d = self.record(records, pair.pair_id, "describe")
        ok, reason, detail = self.describe_verdict(d, pair)
        if not ok:
            if d is not None and self.settled(d, self.used(d), final):
                return "failed", _failure(pair, reason, detail, self.used(d), self.retryable(d, self.used(d)))
            return "todo", _Todo(pair, d, None, "describe")
        description = (d["text"] or "").strip()
        i = self.record(records, pair.pair_id, "instruct")
        ok, reason, detail = self.instruct_verdict(i, description)
        if not ok:
            used = self.used(i, _digest(description))
            if i is not None and used and self.settled(i, used, final):
                return "failed", _failure(pair, reason, detail, used, self.retryable(i, used))
            return "todo", _Todo(pair, d, i, "instruct")
        return "done", self.accepted_row(pair, d, i)

    def accepted_row(self, pair: _Pair, d: dict, i: dict) -> dict[str, Any]:
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


def _failure(pair: _Pair, reason: str, detail: str, attempts: int, retryable: bool) -> dict[str, Any]:
    return {
        "retryable": retryable,  # not a FAILURE_SCHEMA column: counted, not written
        "pair_id": pair.pair_id,
        "q_id": pair.q_id,
        "t_id": pair.t_id,
        "stage": STAGE,
        "reason": reason,
        "detail": (detail or "")[:_DETAIL_CHARS],
        "attempts": attempts,
    }


# ---------------------------------------------------------------------------------------------
# Reading inputs (streamed: memory grows with the work item, not with the corpus)


def _prefixes(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.utf8_slice_codeunits(column, 0, 2)


def _prefix_counts(pairs_path: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for batch in pq.ParquetFile(pairs_path).iter_batches(columns=["pair_id"], batch_size=1 << 16):
        for entry in pc.value_counts(_prefixes(batch.column(0))).to_pylist():
            if entry["values"] is not None:
                counts[entry["values"]] += entry["counts"]
    return dict(counts)


def _read_item_pairs(pairs_path: Path, first: str, last: str) -> tuple[list[_Pair], dict[str, int]]:
    """The item's pairs in pair_id order (a repeated pair id is annotated once), and the raw
    number of rows per prefix."""
    seen: dict[str, _Pair] = {}
    raw: Counter[str] = Counter()
    for batch in pq.ParquetFile(pairs_path).iter_batches(columns=["pair_id", "q_id", "t_id"], batch_size=1 << 16):
        prefixes = _prefixes(batch.column("pair_id"))
        mask = pc.and_(pc.greater_equal(prefixes, first), pc.less_equal(prefixes, last))
        for row in batch.filter(mask).to_pylist():
            raw[prefix_of(row["pair_id"])] += 1
            seen.setdefault(row["pair_id"], _Pair(row["pair_id"], row["q_id"], row["t_id"]))
    return [seen[k] for k in sorted(seen)], dict(raw)


def _attach_images(images_path: Path, pairs: list[_Pair]) -> None:
    wanted = sorted({p.q_id for p in pairs} | {p.t_id for p in pairs})
    found: dict[str, tuple[str, str]] = {}
    if wanted:
        value_set = pa.array(wanted, pa.string())
        for batch in pq.ParquetFile(images_path).iter_batches(columns=["image_id", "path", "caption"], batch_size=1 << 16):
            hit = batch.filter(pc.is_in(batch.column("image_id"), value_set=value_set))
            for row in hit.to_pylist():
                found[row["image_id"]] = (row["path"], row["caption"] or "")
    for p in pairs:
        p.q_path, p.q_caption = found.get(p.q_id, (None, ""))
        p.t_path, p.t_caption = found.get(p.t_id, (None, ""))


# ---------------------------------------------------------------------------------------------
# Planning


def _item_name(item: dict[str, Any]) -> str:
    return f"{shard_name(item['first'])}-{shard_name(item['last'])}"


def _item_inputs(ctx: _Context, pairs: list[_Pair], raw: dict[str, int]) -> str:
    """What a work item's outputs were made from, within one stage execution (generation): its
    pairs, the images file, the annotate config. Equal inputs give equal outputs."""
    images = ctx.layout.images.stat()
    h = hashlib.sha256()
    h.update(json.dumps(
        [RECORD_FORMAT, ctx.namespace, ctx.generation, ctx.acfg.model_dump(mode="json"), ctx.cfg.seed,
         sorted(raw.items()), [str(ctx.layout.images), images.st_size, images.st_mtime_ns]],
        sort_keys=True,
    ).encode())
    for pair in pairs:
        h.update(f"{pair.pair_id}\0{pair.q_id}\0{pair.t_id}\n".encode())
    return h.hexdigest()[:16]


def _finished_item(ctx: _Context, name: str, inputs: str, prefixes: list[str]) -> dict[str, Any] | None:
    """The stats of the item's run in this stage execution when its outputs are all there."""
    path = ctx.stats_dir / f"{name}.json"
    try:
        stats = read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not stats or stats.get("inputs") != inputs:
        return None
    for prefix in prefixes:
        base = ctx.out_dir / shard_name(prefix)
        if not (Path(f"{base}.parquet").is_file() and Path(f"{base}.failures.parquet").is_file()):
            return None
    return stats


def plan_annotate_work(cfg: PipelineConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """Work items for mapping: contiguous pair-id prefix ranges of about `pairs_per_task` pairs
    each (at most 256 items: one per prefix). Small JSON-able dicts."""
    counts = _prefix_counts(layout.pairs)
    items: list[dict[str, Any]] = []
    group: list[str] = []
    n = 0
    for prefix in sorted(counts):
        group.append(prefix)
        n += counts[prefix]
        if n >= cfg.annotate.pairs_per_task:
            items.append({"index": len(items), "first": group[0], "last": group[-1], "pairs": n})
            group, n = [], 0
    if group:
        items.append({"index": len(items), "first": group[0], "last": group[-1], "pairs": n})
    return items


def stage_execution(cfg: PipelineConfig, layout: RunLayout) -> str:
    """Names the annotate stage execution under way (records namespace and generation); it
    changes when `finalize_annotate` completes one. Plans made for the stage (e.g. the catalogue
    reuse split) hold until then."""
    ctx = _Context(cfg, layout)
    return f"{ctx.namespace}:{ctx.generation}"


# ---------------------------------------------------------------------------------------------
# Running one work item


class _Backends:
    """Builds the two step backends only when some pair needs a model, and closes what it built."""

    def __init__(self, cfg: PipelineConfig, layout: RunLayout, given: tuple[Backend, Backend] | None) -> None:
        self.cfg = cfg
        self.layout = layout
        self.pair = given
        self.owned = given is None

    def get(self) -> tuple[Backend, Backend]:
        if self.pair is None:
            kw = {"max_pixels": self.cfg.ingest.max_pixels, "image_cache_dir": self.layout.annotation_dir("request_images")}
            describer = make_backend(self.cfg.annotate.describe, **kw)
            try:
                instructor = make_backend(self.cfg.annotate.instruct, **kw)
            except Exception:
                describer.close()
                raise
            self.pair = (describer, instructor)
        return self.pair

    def close(self) -> None:
        if self.owned and self.pair is not None:
            for backend in {id(b): b for b in self.pair}.values():
                backend.close()
            self.pair = None


class _ItemRun:
    def __init__(self, ctx: _Context, describer: Backend, instructor: Backend, writer: RecordWriter, run_id: str, name: str) -> None:
        self.ctx = ctx
        self.acfg = ctx.acfg
        self.describer = describer
        self.instructor = instructor
        self.writer = writer
        self.run_id = run_id
        self.name = name
        self.outcomes = {step: Counter() for step in STEPS}  # accepted / failed / resampled
        self.attempt_failures = {step: Counter() for step in STEPS}  # failed tries by reason
        self.done = 0
        self._error: BaseException | None = None

    def _record(self, step: str, pair: _Pair, status: str, attempts: int, *, text: str | None = None,
                instructions: list[str] | None = None, served_model: str = "", reason: str = "", detail: str = "",
                seed: int | None = None, input_digest: str = "", retryable: bool | None = None) -> dict[str, Any]:
        backend = self.describer if step == "describe" else self.instructor
        step_cfg = self.acfg.describe if step == "describe" else self.acfg.instruct
        row = {
            "pair_id": pair.pair_id,
            "step": step,
            "prompt_version": self.ctx.prompts.version,
            "model": self.ctx.identity[step][1],
            "input_digest": input_digest,
            "status": status,
            "text": text,
            "instructions": instructions or [],
            "served_model": served_model or backend.model_name,
            "reason": reason,
            "detail": (detail or "")[:_DETAIL_CHARS],
            "attempts": attempts,
            "word_num": pair.word_num,
            "seed": seed,
            "sampling": _sampling(step_cfg, seed),
            "backend": backend.kind,
            "run_id": self.run_id,
            "generation": self.ctx.generation,
            "retryable": retryable,
        }
        self.writer.add(row)
        self.outcomes[step][status] += 1
        return row

    async def _ask(self, step: str, pair: _Pair, used: int, ask: Callable, judge: Callable, digest: str = "") -> dict[str, Any]:
        """Up to `max_attempts` tries of one step for one pair (within the cap across runs): the
        record of the first answer that passes its checks, else of the last failure. Every failed
        try is counted by reason."""
        budget = min(self.acfg.max_attempts, self.ctx.cap - used)
        reason, detail, seed, retryable = "not_annotated", "", None, True
        attempt = used
        for attempt in range(used + 1, used + budget + 1):
            if attempt > used + 1:
                self.outcomes[step]["resampled"] += 1
            seed, result = await ask(attempt)
            if result.ok:
                ok, reason, detail, output = judge(result)
                if ok:
                    return self._record(step, pair, "accepted", attempt, served_model=result.model, seed=seed,
                                        input_digest=digest, **output)
            else:
                reason, detail, retryable = result.error or "bad_response", f"{step}: {result.detail}", result.retryable
            self.attempt_failures[step][reason] += 1
            if not retryable:
                break
        return self._record(step, pair, "failed", attempt, reason=reason, detail=detail, seed=seed,
                            input_digest=digest, retryable=retryable)

    async def _describe(self, pair: _Pair, prior: dict | None) -> dict[str, Any]:
        prompt = self.ctx.prompts.render_describe(pair.word_num)

        async def ask(attempt: int) -> tuple[int, Result]:
            req = DescribeRequest(
                pair_id=pair.pair_id,
                seed_key=f"{pair.key}:describe:{attempt}",
                prompt=prompt,
                word_num=pair.word_num,
                q_image=pair.q_path or "",
                t_image=pair.t_path or "",
                q_caption=pair.q_caption,
                t_caption=pair.t_caption,
            )
            return req.seed, await self.describer.adescribe(req)

        def judge(result: Result) -> tuple[bool, str, str, dict[str, Any]]:
            text = (result.text or "").strip()
            return (*self.ctx.check_description(text, pair), {"text": text})

        return await self._ask("describe", pair, self.ctx.used(prior), ask, judge)

    async def _instruct(self, pair: _Pair, description: str, prior: dict | None) -> dict[str, Any]:
        digest = _digest(description)
        demos = [self.ctx.prompts.demos[i] for i in pair.demo_ids]
        prompt = self.ctx.prompts.render_instruct(demos, description, self.instructor.structured)

        async def ask(attempt: int) -> tuple[int, Result]:
            req = InstructRequest(
                pair_id=pair.pair_id,
                seed_key=f"{pair.key}:instruct:{attempt}",
                prompt=prompt,
                description=description,
                q_caption=pair.q_caption,
                t_caption=pair.t_caption,
                min_instructions=self.acfg.min_instructions,
                max_chars=self.acfg.max_instruction_chars,
            )
            return req.seed, await self.instructor.ainstruct(req)

        def judge(result: Result) -> tuple[bool, str, str, dict[str, Any]]:
            ok, reason, detail, instructions = self.ctx.check_instruct_answer(result.text, description)
            return ok, reason, detail, {"text": result.text, "instructions": instructions}

        return await self._ask("instruct", pair, self.ctx.used(prior, digest), ask, judge, digest)

    async def _one(self, todo: _Todo) -> None:
        pair, d = todo.pair, todo.describe
        if todo.start_at == "describe":
            d = await self._describe(pair, d)
            if d["status"] != "accepted":
                return
        await self._instruct(pair, (d["text"] or "").strip(), todo.instruct)

    async def run(self, todos: Sequence[_Todo]) -> None:
        describer, instructor = self.describer, self.instructor
        concurrency = sum(
            s.concurrency for s, b in ((self.acfg.describe, describer), (self.acfg.instruct, instructor)) if b.kind == "openai"
        )
        window = asyncio.Semaphore(max(self.acfg.batch_size, 2 * concurrency))
        tasks: set[asyncio.Task] = set()
        started = last_log = time.monotonic()

        async def guarded(todo: _Todo) -> None:
            try:
                await self._one(todo)
                self.done += 1
            except BaseException as exc:
                if self._error is None:
                    self._error = exc
            finally:
                window.release()

        async def checkpoints() -> None:
            while True:
                await asyncio.sleep(min(self.acfg.checkpoint_interval_s, 5.0))
                self.writer.maybe_flush()

        async with describer.session(self.acfg.batch_size), instructor.session(self.acfg.batch_size):
            ticker = asyncio.create_task(checkpoints())
            try:
                for todo in todos:
                    await window.acquire()
                    if self._error is not None:
                        window.release()
                        break
                    task = asyncio.create_task(guarded(todo))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    if time.monotonic() - last_log >= _PROGRESS_EVERY_S:
                        last_log = time.monotonic()
                        log.info("annotate %s: %d/%d pairs done (%.1f pairs/s)", self.name, self.done, len(todos),
                                 self.done / max(last_log - started, 1e-9))
                if self._error is not None:
                    for task in list(tasks):
                        task.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                ticker.cancel()
                self.writer.flush()
        if self._error is not None:
            raise self._error


def _write_outputs(ctx: _Context, prefix: str, accepted: list[dict], failed: list[dict], raw_pairs: int) -> None:
    meta = {b"megapairs.pairs_rows": str(raw_pairs).encode()}
    accepted.sort(key=lambda r: r["pair_id"])
    failed.sort(key=lambda r: r["pair_id"])
    name = shard_name(prefix)
    failures = pa.Table.from_pylist(failed, schema=FAILURE_SCHEMA).replace_schema_metadata(meta)
    rows = pa.Table.from_pylist(accepted, schema=ANNOTATION_OUTPUT_SCHEMA).replace_schema_metadata(meta)
    # Failures first: the accepted part is what marks the shard as finished.
    write_parquet(failures, ctx.out_dir / f"{name}.failures.parquet")
    write_parquet(rows, ctx.out_dir / f"{name}.parquet")


def run_annotate_work(
    cfg: PipelineConfig,
    layout: RunLayout,
    item: dict[str, Any],
    run_id: str = "",
    *,
    backends: tuple[Backend, Backend] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Annotate one work item from `plan_annotate_work`. Idempotent: pairs whose outputs were
    accepted before (in this or any earlier run) are skipped, failed ones are retried within the
    attempt budget; results are committed as they arrive. An item that already finished in this
    stage execution with the same inputs is not run again (its stats are returned as they were).
    Returns the item's stats (also written next to its outputs for `finalize_annotate`)."""
    ctx = _Context(cfg, layout)
    name = _item_name(item)
    t0 = time.perf_counter()
    pairs, raw = _read_item_pairs(layout.pairs, item["first"], item["last"])
    inputs = _item_inputs(ctx, pairs, raw)
    finished = _finished_item(ctx, name, inputs, sorted(raw))
    if finished is not None:
        log.info("annotate %s: finished earlier in this stage execution; skipped", name)
        return finished
    _attach_images(layout.images, pairs)
    for pair in pairs:
        ctx.prepare(pair)
    prefixes = sorted(raw)
    records = ctx.store.load(prefixes)
    todos: list[_Todo] = []
    for pair in pairs:
        state, value = ctx.classify(pair, records)
        if state == "todo":
            todos.append(value)

    pool = backends if isinstance(backends, _Backends) else _Backends(cfg, layout, backends)
    request_stats = {step: RequestStats() for step in STEPS}
    outcomes = {step: Counter() for step in STEPS}
    attempt_failures = {step: Counter() for step in STEPS}
    try:
        if todos:
            describer, instructor = pool.get()
            for backend in {id(describer): describer, id(instructor): instructor}.values():
                backend.stats = {step: RequestStats() for step in STEPS}
            writer = RecordWriter(ctx.store, cfg.annotate.checkpoint_every, cfg.annotate.checkpoint_interval_s)
            runner = _ItemRun(ctx, describer, instructor, writer, run_id, name)
            try:
                run_async(runner.run(todos))
            finally:
                request_stats = {"describe": describer.stats["describe"], "instruct": instructor.stats["instruct"]}
                outcomes, attempt_failures = runner.outcomes, runner.attempt_failures
                _log_item(name, request_stats, outcomes, attempt_failures)
    finally:
        if not isinstance(backends, _Backends):
            pool.close()

    # Every pair now has a final outcome: write the shard outputs from the records.
    by_prefix: dict[str, list[_Pair]] = {}
    for pair in pairs:
        by_prefix.setdefault(prefix_of(pair.pair_id), []).append(pair)
    accepted_n = failed_n = retryable_n = 0
    reasons: Counter[str] = Counter()
    for prefix in prefixes:
        ctx.store.compact(prefix)
        shard_records = ctx.store.load([prefix]) if todos else records
        accepted, failed = [], []
        for pair in by_prefix.get(prefix, []):
            state, value = ctx.classify(pair, shard_records, final=True)
            if state == "todo":
                raise RuntimeError(f"annotate {name}: pair {pair.pair_id} has no final outcome after its run")
            (accepted if state == "done" else failed).append(value)
        reasons.update(r["reason"] for r in failed)
        retryable_n += sum(r["retryable"] for r in failed)
        _write_outputs(ctx, prefix, accepted, failed, raw[prefix])
        accepted_n += len(accepted)
        failed_n += len(failed)

    stats = {
        "item": name,
        "pairs": len(pairs),
        "pairs_requested": len(todos),
        "accepted": accepted_n,
        "failed": failed_n,
        "failures_by_reason": dict(sorted(reasons.items())),
        "retryable_failures": retryable_n,
        "seconds": round(time.perf_counter() - t0, 3),
        "steps": {
            step: {
                **request_stats[step].to_dict(),
                **{k: outcomes[step][k] for k in ("accepted", "failed", "resampled")},
                "attempt_failures": dict(sorted(attempt_failures[step].items())),
            }
            for step in STEPS
        },
        "inputs": inputs,
    }
    write_json(stats, ctx.stats_dir / f"{name}.json")
    if progress or todos:
        log.info("annotate %s: %d pairs, %d asked, %d accepted, %d failed", name, len(pairs), len(todos), accepted_n, failed_n)
    return stats


def _log_item(name: str, request_stats: dict[str, RequestStats], outcomes: dict, attempt_failures: dict) -> None:
    for step in STEPS:
        o = outcomes[step]
        failed_tries = ", ".join(f"{k} {v}" for k, v in sorted(attempt_failures[step].items())) or "none"
        log.info(
            "annotate %s [%s]: %s; outputs accepted %d, failed %d, re-sampled %d; failed tries: %s",
            name, step, request_stats[step].summary(), o["accepted"], o["failed"], o["resampled"], failed_tries,
        )


# ---------------------------------------------------------------------------------------------
# Finalising


def _merge(paths: list[Path], schema: pa.Schema, out: Path) -> int:
    rows = 0
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for path in paths:
                table = pq.read_table(path, schema=schema).replace_schema_metadata(None)
                if table.num_rows:
                    writer.write_table(table)
                    rows += table.num_rows
            if rows == 0:
                writer.write_table(schema.empty_table())
    return rows


def finalize_annotate(cfg: PipelineConfig, layout: RunLayout, run_id: str = "") -> dict[str, Any]:
    """Merge the work items' outputs into annotations.parquet (accepted, pair_id order) and the
    stage's failures part; fails if a work item has not finished. Returns the stage stats."""
    ctx = _Context(cfg, layout)
    counts = _prefix_counts(layout.pairs)
    items = plan_annotate_work(cfg, layout)
    accepted_parts, failure_parts = [], []
    for prefix in sorted(counts):
        accepted_path = ctx.out_dir / f"{shard_name(prefix)}.parquet"
        failures_path = ctx.out_dir / f"{shard_name(prefix)}.failures.parquet"
        stale = not (accepted_path.is_file() and failures_path.is_file())
        if not stale:
            meta = pq.read_schema(accepted_path).metadata or {}
            stale = meta.get(b"megapairs.pairs_rows") != str(counts[prefix]).encode()
        if stale:
            item = next(i for i in items if i["first"] <= prefix <= i["last"])
            raise RuntimeError(
                f"annotate: work item {_item_name(item)} (pair ids {item['first']}..{item['last']}) has not finished "
                "with the current pairs; run it before finalizing"
            )
        accepted_parts.append(accepted_path)
        failure_parts.append(failures_path)
    accepted = _merge(accepted_parts, ANNOTATION_OUTPUT_SCHEMA, layout.annotations)
    failed = _merge(failure_parts, FAILURE_SCHEMA, layout.failures_part(STAGE))
    reasons = Counter(pq.read_table(layout.failures_part(STAGE), columns=["reason"]).column("reason").to_pylist())

    steps = {step: RequestStats() for step in STEPS}
    outcomes = {step: Counter() for step in STEPS}
    attempt_failures = {step: Counter() for step in STEPS}
    pairs_requested = retryable = 0
    for item in items:
        path = ctx.stats_dir / f"{_item_name(item)}.json"
        if not path.is_file():
            continue
        data = read_json(path)
        pairs_requested += data.get("pairs_requested", 0)
        retryable += data.get("retryable_failures", 0)
        for step in STEPS:
            steps[step].merge_dict(data["steps"][step])
            outcomes[step].update({k: data["steps"][step].get(k, 0) for k in ("accepted", "failed", "resampled")})
            attempt_failures[step].update(data["steps"][step].get("attempt_failures", {}))
    acfg = cfg.annotate
    (d_kind, d_model), (i_kind, i_model) = ctx.identity["describe"], ctx.identity["instruct"]
    step_stats = {
        step: {
            **steps[step].to_dict(histogram=False),
            **{k: outcomes[step][k] for k in ("accepted", "failed", "resampled")},
            "attempt_failures": dict(sorted(attempt_failures[step].items())),
        }
        for step in STEPS
    }
    for step in STEPS:
        log.info("annotate [%s]: %s", step, steps[step].summary())
    # This stage execution is complete: its failures become retryable for the next one.
    ctx.store.finish_generation(ctx.generation)
    stats = {
        "pairs_in": sum(counts.values()),
        "accepted": accepted,
        "failed": failed,
        "failures_by_reason": dict(sorted(reasons.items())),
        # Failures the next execution of the stage would ask again (a model's bad answer, under
        # max_attempts_across_runs): a re-run of a finished run retries them.
        "retryable_failures": retryable,
        # Which execution of the stage made these outputs: a re-run that retried failures is a
        # new one, so publish runs again with what it added.
        "output_version": f"{ctx.namespace}:{ctx.generation}",
        "describe_backend": d_kind,
        "describe_model": d_model,
        "instruct_backend": i_kind,
        "instruct_model": i_model,
        "prompt_version": acfg.prompt_version,
        "work_items": len(items),
        "pairs_requested": pairs_requested,
        "requests": {step: step_stats[step]["requests"] for step in STEPS},
        "steps": step_stats,
        "records": str(ctx.store.root.relative_to(layout.root)),
        "run_id": run_id,
    }
    log.info(
        "annotate: %d pairs, %d accepted, %d failed %s", stats["pairs_in"], accepted, failed, stats["failures_by_reason"]
    )
    return stats


def annotate_pairs(
    cfg: PipelineConfig,
    layout: RunLayout,
    run_id: str,
    progress: bool = False,
    backends: tuple[Backend, Backend] | None = None,
) -> dict:
    """Describe and instruct every pair in layout.pairs: every work item in turn, then finalize.
    `backends` (describe, instruct) overrides the configured ones (tests, notebooks)."""
    pool = _Backends(cfg, layout, backends)
    try:
        for item in plan_annotate_work(cfg, layout):
            run_annotate_work(cfg, layout, item, run_id, backends=pool, progress=progress)  # type: ignore[arg-type]
    finally:
        pool.close()
    return finalize_annotate(cfg, layout, run_id)
