"""Annotate: for every mined pair, an MLLM description of what the two images share and how they
differ (WORD_NUM words), then >= 3 retrieval instructions from an LLM prompted with five
demonstrations out of a pool of fifty (MegaPairs section 3.1, appendix A).

Pairs are processed in pair_id order, in batches of `annotate.batch_size`; each batch commits one
accepted part and one failures part, so a killed run resumes at the first missing batch and ends
with the same rows as an uninterrupted one. Every random choice (word count, demonstrations,
sampling seed) comes from a stable hash of (run seed, pair id, attempt).

Each step gets `annotate.max_attempts` tries per pair; a description that passed is kept while
only the instructions are re-sampled. `attempts` records the most tries either step needed
(1: both passed first time). Unreadable images fail at once: asking again cannot help.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .annotation.backends import Backend, DescribeRequest, InstructRequest, make_backend
from .annotation.parsing import check_description, check_instructions, parse_instructions, word_count
from .annotation.prompts import PROMPTS_ROOT, Demo, PromptSet, draw_demos, draw_word_num, load_prompt_set, seed_key
from .config import PipelineConfig
from .storage import FAILURE_SCHEMA, RunLayout, load_status, merge_parts, read_json, write_json, write_parquet

log = logging.getLogger(__name__)

STAGE = "annotate"

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

_DETAIL_CHARS = 400


@dataclass
class _Pair:
    pair_id: str
    q_id: str
    t_id: str
    q_path: str | None
    q_caption: str
    t_path: str | None
    t_caption: str
    key: str = ""
    word_num: int = 0
    demos: list[Demo] = field(default_factory=list)
    description: str = ""
    describe_model: str = ""
    describe_attempts: int = 0


def _batches_dir(layout: RunLayout) -> Path:
    return layout.annotation_dir("batches")


def _failures_dir(layout: RunLayout) -> Path:
    return layout.annotation_dir("failures")


def _manifest_path(layout: RunLayout) -> Path:
    return layout.annotation_dir("batches").parent / "manifest.json"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inputs_signature(layout: RunLayout) -> str:
    """What the batch parts were computed from; a mismatch means the parts are stale."""
    status = load_status(layout, "pairs")
    if status and status.get("state") == "done" and status.get("fingerprint"):
        # The pairs stage fingerprint already chains every upstream stage (ingest included).
        return f"pairs-status:{status['fingerprint']}"
    return f"files:{_file_digest(layout.pairs)}:{_file_digest(layout.images)}"


def _prompt_digest(version: str) -> str:
    h = hashlib.sha256()
    for path in sorted((PROMPTS_ROOT / version).glob("*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _prepare_parts(cfg: PipelineConfig, layout: RunLayout) -> tuple[str, bool]:
    """Keep existing batch parts only if they were made from the same inputs and settings."""
    fingerprint = cfg.section_fingerprint(
        "annotate-batches",
        cfg.annotate,
        cfg.seed,
        _inputs_signature(layout),
        _prompt_digest(cfg.annotate.prompt_version),
    )
    manifest = _manifest_path(layout)
    previous = None
    if manifest.is_file():
        try:
            previous = read_json(manifest).get("fingerprint")
        except (OSError, ValueError):
            previous = None
    reused = previous == fingerprint
    if not reused:
        for folder in (_batches_dir(layout), _failures_dir(layout)):
            shutil.rmtree(folder, ignore_errors=True)
        write_json({"fingerprint": fingerprint, "batch_size": cfg.annotate.batch_size}, manifest)
    return fingerprint, reused


def _id_index(ids: pa.ChunkedArray) -> np.ndarray:
    values = ids.to_numpy(zero_copy_only=False)
    try:
        return values.astype("S")  # image ids are hex: 16 bytes each instead of a Python object
    except UnicodeEncodeError:
        return values.astype("U")


class _ImageLookup:
    """image_id -> (path, caption) by binary search over a sorted id array (no per-id dict)."""

    def __init__(self, images_path: Path) -> None:
        table = pq.read_table(images_path, columns=["image_id", "path", "caption"])
        table = table.sort_by("image_id")
        self._ids = _id_index(table.column("image_id"))
        self._paths = table.column("path")
        self._captions = table.column("caption")

    def get(self, image_id: str) -> tuple[str | None, str]:
        width = self._ids.dtype.itemsize // (4 if self._ids.dtype.kind == "U" else 1)
        if len(image_id) > width:  # a fixed-width needle would be truncated into a false match
            return None, ""
        try:
            needle = np.array(image_id, dtype=self._ids.dtype)
        except UnicodeEncodeError:
            return None, ""
        i = int(np.searchsorted(self._ids, needle))
        if i < len(self._ids) and self._ids[i] == needle:
            return self._paths[i].as_py(), self._captions[i].as_py() or ""
        return None, ""


def _read_pairs(path: Path) -> pa.Table:
    table = pq.read_table(path, columns=["pair_id", "q_id", "t_id"])
    return table.take(pc.sort_indices(table, sort_keys=[("pair_id", "ascending")]))


def _failure(pair: _Pair, reason: str, detail: str, attempts: int) -> dict[str, Any]:
    return {
        "pair_id": pair.pair_id,
        "q_id": pair.q_id,
        "t_id": pair.t_id,
        "stage": STAGE,
        "reason": reason,
        "detail": detail[:_DETAIL_CHARS],
        "attempts": attempts,
    }


def _snippet(text: str | None) -> str:
    return repr((text or "")[:160])


class _Annotator:
    def __init__(self, cfg: PipelineConfig, prompts: PromptSet, describer: Backend, instructor: Backend) -> None:
        self.cfg = cfg
        self.acfg = cfg.annotate
        self.prompts = prompts
        self.describer = describer
        self.instructor = instructor

    def run_batch(self, pairs: list[_Pair]) -> tuple[list[dict], list[dict]]:
        failures: list[dict] = []
        live: list[_Pair] = []
        for pair in pairs:
            missing = [i for i, p in ((pair.q_id, pair.q_path), (pair.t_id, pair.t_path)) if p is None]
            if missing:
                failures.append(_failure(pair, "image_missing", f"not in images.parquet: {', '.join(missing)}", 0))
                continue
            pair.key = seed_key(self.cfg.seed, pair.pair_id)
            pair.word_num = draw_word_num(*self.acfg.word_num, pair.key)
            pair.demos = draw_demos(self.prompts.demos, self.acfg.n_demos, pair.key)
            live.append(pair)
        described = self._describe(live, failures)
        accepted = self._instruct(described, failures)
        return accepted, failures

    def _describe(self, pairs: list[_Pair], failures: list[dict]) -> list[_Pair]:
        done: list[_Pair] = []
        pending, last = pairs, {}
        for attempt in range(1, self.acfg.max_attempts + 1):
            if not pending:
                break
            requests = [
                DescribeRequest(
                    pair_id=p.pair_id,
                    seed_key=f"{p.key}:describe:{attempt}",
                    prompt=self.prompts.render_describe(p.word_num),
                    word_num=p.word_num,
                    q_image=p.q_path,
                    t_image=p.t_path,
                    q_caption=p.q_caption,
                    t_caption=p.t_caption,
                )
                for p in pending
            ]
            retry = []
            for pair, result in zip(pending, self.describer.describe(requests)):
                if not result.ok:
                    last[pair.pair_id] = (result.error, f"describe: {result.detail}")
                    if result.retryable:
                        retry.append(pair)
                    else:
                        failures.append(_failure(pair, result.error, f"describe: {result.detail}", attempt))
                    continue
                text = result.text.strip()
                ok, reason = check_description(text, pair.word_num)
                if ok:
                    pair.description, pair.describe_model, pair.describe_attempts = text, result.model, attempt
                    done.append(pair)
                else:
                    detail = f"describe: {word_count(text)} words for word_num={pair.word_num}; output {_snippet(text)}"
                    last[pair.pair_id] = (reason, detail)
                    retry.append(pair)
            pending = retry
        for pair in pending:
            reason, detail = last[pair.pair_id]
            failures.append(_failure(pair, reason, detail, self.acfg.max_attempts))
        return done

    def _instruct(self, pairs: list[_Pair], failures: list[dict]) -> list[dict]:
        accepted: dict[str, dict] = {}
        pending, last = pairs, {}
        for attempt in range(1, self.acfg.max_attempts + 1):
            if not pending:
                break
            requests = [
                InstructRequest(
                    pair_id=p.pair_id,
                    seed_key=f"{p.key}:instruct:{attempt}",
                    prompt=self.prompts.render_instruct(p.demos, p.description, self.instructor.structured),
                    description=p.description,
                    q_caption=p.q_caption,
                    t_caption=p.t_caption,
                )
                for p in pending
            ]
            retry = []
            for pair, result in zip(pending, self.instructor.instruct(requests)):
                if not result.ok:
                    last[pair.pair_id] = (result.error, f"instruct: {result.detail}")
                    retry.append(pair)
                    continue
                instructions = parse_instructions(result.text)
                ok, reason = check_instructions(instructions, pair.description, self.acfg.min_instructions)
                if ok:
                    accepted[pair.pair_id] = {
                        "pair_id": pair.pair_id,
                        "description": pair.description,
                        "instructions": instructions,
                        "word_num": pair.word_num,
                        "describe_backend": self.describer.kind,
                        "describe_model": pair.describe_model,
                        "instruct_backend": self.instructor.kind,
                        "instruct_model": result.model,
                        "prompt_version": self.prompts.version,
                        "attempts": max(pair.describe_attempts, attempt),
                    }
                else:
                    detail = f"instruct: {len(instructions)} parsed; output {_snippet(result.text)}"
                    last[pair.pair_id] = (reason, detail)
                    retry.append(pair)
            pending = retry
        for pair in pending:
            reason, detail = last[pair.pair_id]
            failures.append(_failure(pair, reason, detail, self.acfg.max_attempts))
        return [accepted[p.pair_id] for p in pairs if p.pair_id in accepted]


def _write_batch(layout: RunLayout, index: int, accepted: list[dict], failures: list[dict]) -> None:
    name = f"part-{index:05d}.parquet"
    failures.sort(key=lambda r: r["pair_id"])
    # Failures first: the accepted part is the commit marker that makes a batch count as done.
    write_parquet(pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA), _failures_dir(layout) / name)
    write_parquet(pa.Table.from_pylist(accepted, schema=ANNOTATION_SCHEMA), _batches_dir(layout) / name)


def annotate_pairs(
    cfg: PipelineConfig,
    layout: RunLayout,
    run_id: str,
    progress: bool = False,
    backends: tuple[Backend, Backend] | None = None,
) -> dict:
    """Describe and instruct every pair in layout.pairs; `backends` (describe, instruct) overrides
    the configured ones (tests, notebooks)."""
    acfg = cfg.annotate
    prompts = load_prompt_set(acfg.prompt_version)
    if acfg.n_demos > len(prompts.demos):
        raise ValueError(f"annotate.n_demos ({acfg.n_demos}) exceeds the demo pool ({len(prompts.demos)})")
    _, reused = _prepare_parts(cfg, layout)
    pairs = _read_pairs(layout.pairs)
    images = _ImageLookup(layout.images)
    n_pairs = pairs.num_rows
    n_batches = -(-n_pairs // acfg.batch_size)

    owned = backends is None
    if backends is None:
        describer = make_backend(acfg.describe, max_pixels=cfg.ingest.max_pixels)
        try:
            instructor = make_backend(acfg.instruct, max_pixels=cfg.ingest.max_pixels)
        except Exception:
            describer.close()
            raise
    else:
        describer, instructor = backends
    annotator = _Annotator(cfg, prompts, describer, instructor)
    skipped = 0
    try:
        for index in range(n_batches):
            part = _batches_dir(layout) / f"part-{index:05d}.parquet"
            if part.is_file() and (_failures_dir(layout) / part.name).is_file():
                skipped += 1
                continue
            chunk = pairs.slice(index * acfg.batch_size, acfg.batch_size).to_pylist()
            batch = []
            for row in chunk:
                q_path, q_caption = images.get(row["q_id"])
                t_path, t_caption = images.get(row["t_id"])
                batch.append(_Pair(row["pair_id"], row["q_id"], row["t_id"], q_path, q_caption, t_path, t_caption))
            accepted, failures = annotator.run_batch(batch)
            _write_batch(layout, index, accepted, failures)
            if progress:
                log.info(
                    "annotate: batch %d/%d: %d accepted, %d failed", index + 1, n_batches, len(accepted), len(failures)
                )
    finally:
        if owned:
            describer.close()
            instructor.close()

    accepted_n = merge_parts(_batches_dir(layout), ANNOTATION_SCHEMA, layout.annotations)
    failed_n = merge_parts(_failures_dir(layout), FAILURE_SCHEMA, layout.failures_part(STAGE))
    reasons = Counter(pq.read_table(layout.failures_part(STAGE), columns=["reason"]).column("reason").to_pylist())
    d_counts, i_counts = describer.counts, instructor.counts
    return {
        "pairs_in": n_pairs,
        "accepted": accepted_n,
        "failed": failed_n,
        "failures_by_reason": dict(sorted(reasons.items())),
        "describe_backend": describer.kind,
        "describe_model": describer.model_name,
        "instruct_backend": instructor.kind,
        "instruct_model": instructor.model_name,
        "prompt_version": prompts.version,
        "batches": n_batches,
        "batches_resumed": skipped,
        "parts_reused": reused,
        "requests": {"describe": d_counts.get("describe", 0), "instruct": i_counts.get("instruct", 0)},
        "http_requests": d_counts.get("http_requests", 0) + i_counts.get("http_requests", 0),
        "http_retries": d_counts.get("http_retries", 0) + i_counts.get("http_retries", 0),
        "run_id": run_id,
    }
