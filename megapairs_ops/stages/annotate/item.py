"""One annotate work item: its pairs flow on their own through describe -> checks -> instruct ->
checks, so both endpoints stay busy; batch backends (local models) get the pairs in flight as
batches. Each finished (pair, step) outcome is checkpointed as a record (records.py) as it
arrives, and the item ends with its accepted annotations and failures written as its parts.

Every random choice (word count, demonstrations, sampling seed) comes from a stable hash of
(run seed, pair id, attempt): a resumed run asks exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megapairs_ops.config import PipelineConfig
from megapairs_ops.errors import ItemsNotDone
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import ANNOTATION_OUTPUT_SCHEMA, FAILURE_SCHEMA
from megapairs_ops.stages.annotate.backends import Backend, make_backend, run_async
from megapairs_ops.stages.annotate.outcomes import DETAIL_CHARS, Answers, Pair, Todo, digest, sampling
from megapairs_ops.stages.annotate.records import RecordWriter, prefix_of
from megapairs_ops.stages.annotate.request_stats import RequestStats
from megapairs_ops.stages.annotate.types import STEPS, DescribeRequest, InstructRequest, Result
from megapairs_ops.storage import WorkDir, write_parquet

log = logging.getLogger("megapairs_ops.stages.annotate")

_PROGRESS_EVERY_S = 60.0


def pair_prefixes(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The two hex characters of each pair id that place it in a work item (its id range)."""
    return pc.utf8_slice_codeunits(column, 0, 2)


def _read_item_pairs(pairs_path: Path, first: str, last: str) -> tuple[list[Pair], dict[str, int]]:
    """The item's pairs in pair_id order (a repeated pair id is annotated once), and the raw
    number of rows per prefix."""
    seen: dict[str, Pair] = {}
    raw: Counter[str] = Counter()
    for batch in pq.ParquetFile(pairs_path).iter_batches(columns=["pair_id", "q_id", "t_id"], batch_size=1 << 16):
        prefixes = pair_prefixes(batch.column("pair_id"))
        mask = pc.and_(pc.greater_equal(prefixes, first), pc.less_equal(prefixes, last))
        for row in batch.filter(mask).to_pylist():
            raw[prefix_of(row["pair_id"])] += 1
            seen.setdefault(row["pair_id"], Pair(row["pair_id"], row["q_id"], row["t_id"]))
    return [seen[k] for k in sorted(seen)], dict(raw)


def _attach_images(images_path: Path, pairs: list[Pair]) -> None:
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


class ItemBackends:
    """Builds the two step backends only when some pair needs a model, and closes what it built."""

    def __init__(self, cfg: PipelineConfig, layout: RunLayout, given: tuple[Backend, Backend] | None) -> None:
        self.cfg = cfg
        self.layout = layout
        self.pair = given
        self.owned = given is None

    def get(self) -> tuple[Backend, Backend]:
        if self.pair is None:
            kw = {"max_pixels": self.cfg.ingest.max_pixels, "image_cache_dir": self.layout.request_images}
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
    def __init__(self, ctx: Answers, describer: Backend, instructor: Backend, writer: RecordWriter, run_id: str, name: str) -> None:
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

    def _record(self, step: str, pair: Pair, status: str, attempts: int, *, text: str | None = None,
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
            "detail": (detail or "")[:DETAIL_CHARS],
            "attempts": attempts,
            "word_num": pair.word_num,
            "seed": seed,
            "sampling": sampling(step_cfg, seed),
            "backend": backend.kind,
            "run_id": self.run_id,
            "execution": self.ctx.execution,
            "retryable": retryable,
        }
        self.writer.add(row)
        self.outcomes[step][status] += 1
        return row

    async def _ask(self, step: str, pair: Pair, used: int, ask: Callable, judge: Callable, digest: str = "") -> dict[str, Any]:
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

    async def _describe(self, pair: Pair, prior: dict | None) -> dict[str, Any]:
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

    async def _instruct(self, pair: Pair, description: str, prior: dict | None) -> dict[str, Any]:
        described = digest(description)
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

        return await self._ask("instruct", pair, self.ctx.used(prior, described), ask, judge, described)

    async def _one(self, todo: Todo) -> None:
        pair, d = todo.pair, todo.describe
        if todo.start_at == "describe":
            d = await self._describe(pair, d)
            if d["status"] != "accepted":
                return
        await self._instruct(pair, (d["text"] or "").strip(), todo.instruct)

    async def run(self, todos: Sequence[Todo]) -> None:
        describer, instructor = self.describer, self.instructor
        concurrency = sum(
            s.concurrency for s, b in ((self.acfg.describe, describer), (self.acfg.instruct, instructor)) if b.kind == "openai"
        )
        window = asyncio.Semaphore(max(self.acfg.batch_size, 2 * concurrency))
        tasks: set[asyncio.Task] = set()
        started = last_log = time.monotonic()

        async def guarded(todo: Todo) -> None:
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


def item_parts(work: WorkDir, item_id: str) -> tuple[Path, Path]:
    """(accepted annotations, failures) of one work item."""
    return work.part(item_id, "annotations"), work.part(item_id, "failures")


def _write_outputs(work: WorkDir, item_id: str, accepted: list[dict], failed: list[dict]) -> None:
    accepted.sort(key=lambda r: r["pair_id"])
    failed.sort(key=lambda r: r["pair_id"])
    annotations_path, failures_path = item_parts(work, item_id)
    write_parquet(pa.Table.from_pylist(failed, schema=FAILURE_SCHEMA), failures_path)
    write_parquet(pa.Table.from_pylist(accepted, schema=ANNOTATION_OUTPUT_SCHEMA), annotations_path)


def annotate_item(
    cfg: PipelineConfig,
    layout: RunLayout,
    work: WorkDir,
    item: dict[str, Any],
    run_id: str = "",
    *,
    backends: "ItemBackends | tuple[Backend, Backend] | None" = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Annotate one work item of the plan (a pair-id prefix range) and write its parts; returns
    its stats, which commit it. Pairs whose outputs were accepted before (in this or any earlier
    run) are not asked again, failed ones are retried within the attempt budget; every outcome is
    checkpointed as it arrives, so a killed task resumes from its records."""
    plan = work.plan()
    if plan is None:
        raise ItemsNotDone(f"{work.root}: annotate was not planned; plan the stage first")
    ctx = Answers(cfg, layout, plan["execution"])
    name = item["id"]
    t0 = time.perf_counter()
    pairs, raw = _read_item_pairs(Path(plan["pairs"]), item["first"], item["last"])
    _attach_images(layout.images, pairs)
    for pair in pairs:
        ctx.prepare(pair)
    prefixes = sorted(raw)
    records = ctx.store.load(prefixes)
    todos: list[Todo] = []
    for pair in pairs:
        state, value = ctx.classify(pair, records)
        if state == "todo":
            todos.append(value)

    pool = backends if isinstance(backends, ItemBackends) else ItemBackends(cfg, layout, backends)
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
        if not isinstance(backends, ItemBackends):
            pool.close()

    # Every pair now has a final outcome: write the item's parts from the records.
    accepted: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for prefix in prefixes:
        ctx.store.compact(prefix)
    final_records = ctx.store.load(prefixes) if todos else records
    for pair in pairs:
        state, value = ctx.classify(pair, final_records, final=True)
        if state == "todo":
            raise RuntimeError(f"annotate {name}: pair {pair.pair_id} has no final outcome after its run")
        (accepted if state == "done" else failed).append(value)
    reasons = Counter(r["reason"] for r in failed)
    _write_outputs(work, name, accepted, failed)

    stats = {
        "item": name,
        "pairs": len(pairs),
        "pairs_requested": len(todos),
        "raw_pairs": sum(raw.values()),
        "accepted": len(accepted),
        "failed": len(failed),
        "failures_by_reason": dict(sorted(reasons.items())),
        "retryable_failures": sum(r["retryable"] for r in failed),
        "seconds": round(time.perf_counter() - t0, 3),
        "steps": {
            step: {
                **request_stats[step].to_dict(),
                **{k: outcomes[step][k] for k in ("accepted", "failed", "resampled")},
                "attempt_failures": dict(sorted(attempt_failures[step].items())),
            }
            for step in STEPS
        },
    }
    if progress or todos:
        log.info("annotate %s: %d pairs, %d asked, %d accepted, %d failed", name, len(pairs), len(todos),
                 len(accepted), len(failed))
    return stats


def _log_item(name: str, request_stats: dict[str, RequestStats], outcomes: dict, attempt_failures: dict) -> None:
    for step in STEPS:
        o = outcomes[step]
        failed_tries = ", ".join(f"{k} {v}" for k, v in sorted(attempt_failures[step].items())) or "none"
        log.info(
            "annotate %s [%s]: %s; outputs accepted %d, failed %d, re-sampled %d; failed tries: %s",
            name, step, request_stats[step].summary(), o["accepted"], o["failed"], o["resampled"], failed_tries,
        )
