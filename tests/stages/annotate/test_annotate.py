import hashlib
import json
import logging
import shutil
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megapairs_ops.config import ConfigError, parse_config
from megapairs_ops.errors import ItemsNotDone
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import ANNOTATION_OUTPUT_SCHEMA, ANNOTATION_SCHEMA, FAILURE_SCHEMA
from megapairs_ops.stages.annotate.backends import Backend
from megapairs_ops.stages.annotate.backends.template import TemplateBackend
from megapairs_ops.stages.annotate.checks import check_instructions
from megapairs_ops.stages.annotate.records import RecordStore
from megapairs_ops.stages.annotate.work import (
    annotate_pairs,
    finalize_annotate,
    plan_annotate_work,
    run_annotate_work,
)
from tests.fixtures.paths import REPO

CAPTIONS = [
    "A red bicycle leaning against a yellow wall",
    "A cream scooter parked by a green wall",
    "A ginger cat asleep on a grey sofa",
    "A border collie sitting on a grey sofa",
    "Red apples in a wooden bowl on marble",
    "Oranges in a wooden bowl on marble",
    "A lighthouse on rocks under a clear sky",
    "A lighthouse on rocks in a storm at night",
]
# (q, t) by index into CAPTIONS; 8 stands for an image id that ingest never produced.
PAIR_INDEXES = [(0, 1), (1, 0), (2, 3), (3, 2), (4, 5), (5, 4), (6, 7), (7, 6), (0, 8), (2, 5), (7, 3)]
BROKEN = 7  # this image's file is corrupt: only backends that look at pixels notice


def pair_id(q, t):
    return hashlib.sha256(f"{q}:{t}".encode()).hexdigest()[:16]


def write_inputs(root):
    """A hand-made images.parquet and pairs.parquet in the contract's schemas."""
    layout = RunLayout(root)
    img_dir = root / "corpus"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        path = img_dir / f"img{i}.png"
        if i == BROKEN:
            path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        rows.append(
            {"image_id": sha[:16], "sha256": sha, "path": str(path), "caption": caption, "width": 64,
             "height": 48, "mode": "RGB", "phash": i, "file_bytes": len(data), "duplicate_paths": []}
        )
    ids = [r["image_id"] for r in rows] + ["00000000deadbeef"]
    layout.images.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sorted(rows, key=lambda r: r["image_id"])), layout.images)
    pairs = [
        {"pair_id": pair_id(ids[q], ids[t]), "q_id": ids[q], "t_id": ids[t], "encoders": ["color"],
         "sims": [0.9], "max_sim": 0.9, "hn_ids": []}
        for q, t in PAIR_INDEXES
    ]
    pq.write_table(pa.Table.from_pylist(pairs[::-1]), layout.pairs)  # deliberately not in pair_id order
    return layout


def make_cfg(batch_size=3, seed=0, **annotate):
    return parse_config(
        {
            "seed": seed,
            "encoders": [{"name": "color", "kind": "classic_color_layout"}],
            "annotate": {"batch_size": batch_size, **annotate},
        }
    )


@pytest.fixture
def layout(tmp_path):
    return write_inputs(tmp_path / "run")


def read(path):
    return pq.read_table(path)


class Recording(Backend):
    """The template baseline, remembering which pairs it was asked about."""

    kind = "template"

    def __init__(self, crash_after_batches=None):
        super().__init__()
        self.inner = TemplateBackend()
        self.model_name = self.inner.model_name
        self.seen: list[str] = []
        self.crash_after_batches = crash_after_batches
        self.batches = 0

    def describe(self, requests):
        if self.crash_after_batches is not None and self.batches >= self.crash_after_batches:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.seen += [r.pair_id for r in requests]
        return self.inner.describe(requests)

    def instruct(self, requests):
        return self.inner.instruct(requests)


def check_outputs(layout, cfg, stats):
    ann, fail = read(layout.annotations), read(layout.failures_part("annotate"))
    assert ann.schema.equals(ANNOTATION_OUTPUT_SCHEMA) and fail.schema.equals(FAILURE_SCHEMA)
    assert ANNOTATION_OUTPUT_SCHEMA.names[: len(ANNOTATION_SCHEMA)] == ANNOTATION_SCHEMA.names  # contract first
    ids = ann.column("pair_id").to_pylist()
    failed_ids = fail.column("pair_id").to_pylist()
    all_ids = sorted(pq.read_table(layout.pairs).column("pair_id").to_pylist())
    assert stats["accepted"] + stats["failed"] == stats["pairs_in"] == len(all_ids)
    assert len(ids) == len(set(ids)) and len(failed_ids) == len(set(failed_ids))
    assert sorted(ids + failed_ids) == all_ids  # nothing lost, nothing doubled
    assert ids == sorted(ids)
    lo, hi = cfg.annotate.word_num
    for row in ann.to_pylist():
        assert lo <= row["word_num"] <= hi
        assert check_instructions(row["instructions"], row["description"], cfg.annotate.min_instructions)[0]
        assert row["prompt_version"] == "v1" and 1 <= row["attempts"] <= cfg.annotate.max_attempts_across_runs
    return ann, fail


def test_template_stage_accepts_every_pair_with_images(layout):
    cfg = make_cfg()
    stats = annotate_pairs(cfg, layout, "run-1")
    ann, fail = check_outputs(layout, cfg, stats)
    assert stats["pairs_in"] == 11 and stats["accepted"] == 10 and stats["failed"] == 1
    assert stats["failures_by_reason"] == {"image_missing": 1}
    assert fail.to_pylist()[0]["stage"] == "annotate" and "00000000deadbeef" in fail.to_pylist()[0]["detail"]
    assert fail.to_pylist()[0]["attempts"] == 0
    assert stats["describe_model"] == stats["instruct_model"] == "template-baseline-v1"
    assert set(ann.column("describe_backend").to_pylist()) == {"template"}
    assert stats["requests"] == {"describe": 10, "instruct": 10} and stats["pairs_requested"] == 10
    assert stats["work_items"] == 1
    row = ann.to_pylist()[0]
    assert len(row["demo_ids"]) == 5 and len(set(row["demo_ids"])) == 5
    assert json.loads(row["describe_sampling"]) == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "seed": row["describe_seed"]}


def test_rerun_is_a_no_op_and_identical(layout):
    cfg = make_cfg()
    annotate_pairs(cfg, layout, "run-1")
    first = read(layout.annotations)
    recorder = Recording()
    stats = annotate_pairs(cfg, layout, "run-1", backends=(recorder, recorder))
    assert recorder.seen == [] and stats["pairs_requested"] == 0
    assert read(layout.annotations).equals(first)


def test_lost_records_are_redone_alone(layout):
    cfg = make_cfg()
    annotate_pairs(cfg, layout, "run-1")
    first, first_fail = read(layout.annotations), read(layout.failures_part("annotate"))
    shard = sorted(p for p in layout.annotation_records.glob("*/*") if p.is_dir())[0]
    expected = sorted({r["pair_id"] for r in pq.read_table(shard).to_pylist()})
    shutil.rmtree(shard)
    recorder = Recording()
    annotate_pairs(cfg, layout, "run-1", backends=(recorder, recorder))
    assert sorted(recorder.seen) == expected
    assert read(layout.annotations).equals(first)
    assert read(layout.failures_part("annotate")).equals(first_fail)


def test_changed_question_asks_anew_and_other_settings_reuse_records(layout):
    annotate_pairs(make_cfg(seed=0), layout, "run-1")
    before = read(layout.annotations)
    stats = annotate_pairs(make_cfg(seed=1), layout, "run-1")
    assert stats["pairs_requested"] == 10
    after = read(layout.annotations)
    assert after.column("pair_id").equals(before.column("pair_id"))
    assert after.column("word_num").to_pylist() != before.column("word_num").to_pylist()
    # Batching and checkpointing settings never change the result, and reuse every record.
    stats = annotate_pairs(make_cfg(seed=1, batch_size=5, checkpoint_every=1), layout, "run-1")
    assert stats["pairs_requested"] == 0 and read(layout.annotations).equals(after)
    # Back to the first question: its records are still there.
    assert annotate_pairs(make_cfg(seed=0), layout, "run-1")["pairs_requested"] == 0
    assert read(layout.annotations).equals(before)


def test_accepted_outputs_are_rechecked_against_current_checks(layout):
    annotate_pairs(make_cfg(), layout, "run-1")
    stats = annotate_pairs(make_cfg(max_instruction_chars=20, max_attempts=1), layout, "run-1")
    assert stats["requests"]["describe"] == 0 and stats["requests"]["instruct"] == 10
    assert stats["failures_by_reason"] == {"image_missing": 1, "instruction_too_long": 10}


def openai_cfg(llm_server, step=None, **annotate):
    step = {"backend": "openai", "model": "fake-mllm", "base_url": llm_server.base_url, "concurrency": 3,
            "image_max_side": 64, "backoff_s": 0.001, "max_backoff_s": 0.02, "breaker_cooldown_s": 0.01, **(step or {})}
    return make_cfg(describe=step, instruct=step, **annotate)


def test_openai_stage_against_loopback_server(layout, llm_server):
    llm_server.reset()
    cfg = openai_cfg(llm_server)
    stats = annotate_pairs(cfg, layout, "run-1")
    ann, fail = check_outputs(layout, cfg, stats)
    # Pairs touching the corrupt image fail once, without a retry; the unknown id never gets a request.
    reasons = {r["pair_id"]: (r["reason"], r["attempts"]) for r in fail.to_pylist()}
    assert sorted(v[0] for v in reasons.values()) == ["image_missing"] + ["truncated_image"] * 3
    assert all(attempts <= 1 for _, attempts in reasons.values())
    assert stats["accepted"] == 7 and stats["describe_model"] == "fake-mllm"
    assert set(ann.column("describe_backend").to_pylist()) == {"openai"}
    describes = llm_server.chat_requests("describe")
    assert len(describes) == 7 and all(len(r.images()) == 2 for r in describes)
    assert len(llm_server.chat_requests("instruct")) == 7
    # Each instruct prompt carries five demonstrations and the accepted description.
    prompt = llm_server.chat_requests("instruct")[0].text()
    assert prompt.count("Description:") == 6
    assert any(row["description"] in prompt for row in ann.to_pylist())

    # A forced full re-run against the same server gives the same rows (seeded requests).
    shutil.rmtree(layout.root / "annotations")
    annotate_pairs(cfg, layout, "run-2")
    assert read(layout.annotations).equals(ann)


def good_pair_layout(root):
    """A run with exactly one pair, whose two images are both readable."""
    layout = write_inputs(root)
    pid = pair_id(*[_id(layout, i) for i in (0, 1)])
    table = read(layout.pairs)
    pq.write_table(table.filter(pa.compute.equal(table.column("pair_id"), pid)), layout.pairs)
    return layout


def _id(layout, index):
    for row in read(layout.images).to_pylist():
        if row["path"].endswith(f"img{index}.png"):
            return row["image_id"]
    raise KeyError(index)


def test_refusals_are_resampled_then_accepted(tmp_path, llm_server):
    llm_server.reset()
    layout = good_pair_layout(tmp_path / "run")
    llm_server.inject("refusal", times=2, kind="instruct")
    llm_server.inject("short", times=1, kind="describe")
    stats = annotate_pairs(openai_cfg(llm_server, max_attempts=3), layout, "run-1")
    assert stats["accepted"] == 1 and stats["failed"] == 0
    (row,) = read(layout.annotations).to_pylist()
    assert row["attempts"] == 3
    seeds = [r.body["seed"] for r in llm_server.chat_requests("instruct")]
    assert len(seeds) == 3 and len(set(seeds)) == 3  # each retry is a fresh sample


BAD_OUTPUTS = [
    ("refusal", "instruct", "refusal"),
    ("too_few", "instruct", "too_few_instructions"),
    ("refusal", "describe", "refusal"),
    ("short", "describe", "description_too_short"),
    ("malformed", "instruct", "bad_response"),
    ("duplicated", "instruct", "too_few_instructions"),
    ("bad_json", "instruct", "unclosed_json"),
    # damaged answers (issue 11): each is re-sampled, then fails with its own reason
    ("truncated", "describe", "truncated"),
    ("truncated", "instruct", "truncated"),
    ("content_filter", "describe", "content_filter"),
    ("content_filter", "instruct", "content_filter"),
    ("template_debris", "describe", "template_token"),
    ("template_debris", "instruct", "template_token"),
    ("meta_language", "instruct", "meta_language"),
    ("cut_last", "instruct", "unfinished_sentence"),
]


# Structured output (a JSON schema) changes only the instruct step's answers: both paths are held
# to the same checks.
@pytest.mark.parametrize(
    ("fault", "kind", "reason", "structured"),
    [(*case, False) for case in BAD_OUTPUTS] + [(*case, True) for case in BAD_OUTPUTS if case[1] == "instruct"],
)
def test_persistent_bad_output_ends_as_a_failure_row(tmp_path, llm_server, fault, kind, reason, structured):
    llm_server.reset()
    layout = good_pair_layout(tmp_path / "run")
    llm_server.inject(fault, times=100, kind=kind)
    cfg = openai_cfg(llm_server, {"structured_output": structured}, max_attempts=2)
    stats = annotate_pairs(cfg, layout, "run-1")
    assert stats["accepted"] == 0 and stats["failures_by_reason"] == {reason: 1}
    assert stats["retryable_failures"] == 1  # a model's bad answer: a later run may ask again
    assert stats["steps"][kind]["attempt_failures"] == {reason: 2}
    (row,) = read(layout.failures_part("annotate")).to_pylist()
    assert row["attempts"] == 2 and row["detail"].startswith(f"{kind}: ")
    assert len(llm_server.chat_requests(kind)) == 2
    assert all(bool(r.body.get("response_format")) == structured for r in llm_server.chat_requests("instruct"))
    assert read(layout.annotations).num_rows == 0


def test_transformers_instruct_path_ends_accepted_or_failed_with_reason(layout, tiny_causal_lm_dir):
    cfg = make_cfg(
        batch_size=4,
        max_attempts=2,
        instruct={"backend": "transformers", "model": str(tiny_causal_lm_dir), "max_tokens": 16, "device": "cpu"},
    )
    stats = annotate_pairs(cfg, layout, "run-1")
    ann, fail = check_outputs(layout, cfg, stats)
    assert stats["instruct_model"] == str(tiny_causal_lm_dir) and stats["requests"]["instruct"] >= 10
    # Random weights write junk: whatever they write is either accepted or failed with a reason.
    assert all(r["reason"] for r in fail.to_pylist())
    assert set(ann.column("instruct_backend").to_pylist()) <= {"transformers"}


def test_transformers_describe_path(layout, tiny_vlm_dir):
    cfg = make_cfg(
        batch_size=6,
        max_attempts=1,
        describe={"backend": "transformers", "model": str(tiny_vlm_dir), "max_tokens": 8, "image_max_side": 32},
    )
    stats = annotate_pairs(cfg, layout, "run-1")
    _, fail = check_outputs(layout, cfg, stats)
    reasons = stats["failures_by_reason"]
    assert reasons.get("image_missing") == 1 and reasons.get("truncated_image") == 3
    # Eight new tokens are far from a description: the real path ran and its answers failed. Most
    # stop at max_tokens and fail as truncated, never judged as text; one whose random weights
    # emitted the end token early fails the text checks.
    model_reasons = {k: v for k, v in reasons.items() if k not in ("image_missing", "truncated_image")}
    assert sum(model_reasons.values()) == 7 and model_reasons.get("truncated", 0) >= 4
    assert set(model_reasons) <= {"truncated", "unfinished_sentence", "description_too_short", "empty_description"}
    details = [r["detail"] for r in fail.to_pylist() if r["reason"] == "truncated"]
    assert all(d.startswith("describe: finish_reason=length after 8 tokens (max_tokens=8)") for d in details)
    assert stats["steps"]["describe"]["attempt_failures"] == {**model_reasons, "truncated_image": 3}
    assert stats["describe_model"] == str(tiny_vlm_dir)


# -- faults, kills, work items ------------------------------------------------------------------

FAULT_MIX = {
    "http_500": 0.05, "http_429": 0.05, "slow": 0.04, "drop": 0.05, "malformed": 0.05,
    "too_few": 0.06, "refusal": 0.06, "duplicated": 0.06, "bad_json": 0.05, "short": 0.06,
}


def all_pairs_layout(root):
    """Every ordered pair of the eight images: 56 pairs, the 14 touching the corrupt image among them."""
    layout = write_inputs(root)
    ids = [_id(layout, i) for i in range(len(CAPTIONS))]
    pairs = [
        {"pair_id": pair_id(ids[q], ids[t]), "q_id": ids[q], "t_id": ids[t], "encoders": ["color"], "sims": [0.9],
         "max_sim": 0.9, "hn_ids": []}
        for q in range(len(ids)) for t in range(len(ids)) if q != t
    ]
    pq.write_table(pa.Table.from_pylist(pairs), layout.pairs)
    return layout


def fault_cfg(llm_server, **annotate):
    step = {"concurrency": 4, "timeout_s": 0.3, "http_attempts": 2, "breaker_failures": 6}
    return openai_cfg(llm_server, step, max_attempts=2, max_attempts_across_runs=6, checkpoint_every=4, **annotate)


def test_fault_mix_run_completes_and_a_clean_rerun_finishes_the_failures(tmp_path, llm_server):
    llm_server.reset()
    layout = all_pairs_layout(tmp_path / "run")
    cfg = fault_cfg(llm_server)
    for fault in FAULT_MIX:  # each at least once, then at random
        kind = {"short": "describe", "too_few": "instruct", "duplicated": "instruct", "bad_json": "instruct"}.get(fault)
        llm_server.inject(fault, kind=kind, retry_after="0.01", delay_s=0.6)
    llm_server.set_fault_mix(FAULT_MIX, seed=3, retry_after="0.01", delay_s=0.6)
    stats = annotate_pairs(cfg, layout, "run-1")
    ann, fail = check_outputs(layout, cfg, stats)  # every pair accepted or failed, once
    injected = {r.fault for r in llm_server.chat_requests()} - {None}
    assert injected == set(FAULT_MIX)
    # The server rejects (400) any describe request without two decodable images: none was sent.
    assert all(len(r.image_urls()) == 2 for r in llm_server.chat_requests("describe"))
    assert "http_error" not in stats["failures_by_reason"]
    image_failures = [r for r in fail.to_pylist() if r["reason"] in ("truncated_image", "corrupt_image")]
    model_failures = [r for r in fail.to_pylist() if r not in image_failures]
    assert len(image_failures) == 14 and model_failures, "the mix should defeat some pairs"
    assert all(r["reason"] and r["detail"].startswith(("describe:", "instruct:")) for r in model_failures)
    errors = stats["steps"]["describe"]["errors"] | stats["steps"]["instruct"]["errors"]
    assert {"server_error", "rate_limited", "timeout", "connection_error", "bad_response"} <= set(errors)
    for step in ("describe", "instruct"):
        s = stats["steps"][step]
        assert s["requests"] > 0 and s["retries"] > 0 and s["tokens_in"] > 0 and s["tokens_out"] > 0
        assert s["latency_ms"]["p50"] is not None and s["latency_ms"]["p95"] >= s["latency_ms"]["p50"]
        assert s["accepted"] > 0

    llm_server.reset()
    need_describe = sum(r["detail"].startswith("describe:") for r in model_failures)
    stats = annotate_pairs(cfg, layout, "run-2")
    ann2, fail2 = check_outputs(layout, cfg, stats)
    assert stats["accepted"] == 42 and set(stats["failures_by_reason"]) <= {"truncated_image", "corrupt_image"}
    # Only the failed ones were asked again, each once (no faults now); nothing accepted was redone.
    assert len(llm_server.chat_requests("describe")) == need_describe
    assert len(llm_server.chat_requests("instruct")) == len(model_failures)
    before = {r["pair_id"]: r for r in ann.to_pylist()}
    assert all(before[r["pair_id"]] == r for r in ann2.to_pylist() if r["pair_id"] in before)
    assert max(r["attempts"] for r in ann2.to_pylist()) > 2  # attempts count across runs


def test_failures_are_retried_across_runs_up_to_the_cap(tmp_path, llm_server):
    llm_server.reset()
    layout = good_pair_layout(tmp_path / "run")
    cfg = openai_cfg(llm_server, max_attempts=2, max_attempts_across_runs=3)
    llm_server.inject("refusal", times=100, kind="instruct")
    attempts = []
    for run in range(3):
        annotate_pairs(cfg, layout, f"run-{run}")
        (row,) = read(layout.failures_part("annotate")).to_pylist()
        attempts.append((row["attempts"], len(llm_server.chat_requests("instruct"))))
    assert attempts == [(2, 2), (3, 3), (3, 3)]  # the third run asks nothing
    assert len(llm_server.chat_requests("describe")) == 1  # the accepted description was kept
    llm_server.reset()


KILLER = """
import json, os, signal, sys
from megapairs_ops.stages.annotate import records
from megapairs_ops.stages.annotate.work import annotate_pairs
from megapairs_ops.config import ConfigError, parse_config
from megapairs_ops.errors import ItemsNotDone
from megapairs_ops.layout import RunLayout

root, kill_after, cfg = sys.argv[1], int(sys.argv[2]), parse_config(json.loads(sys.argv[3]))
flush = records.RecordWriter.flush

def flush_then_die(self):
    flush(self)
    if self.records_written >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

records.RecordWriter.flush = flush_then_die
annotate_pairs(cfg, RunLayout(root), "run-1")
"""


def test_killed_task_resumes_without_asking_twice_or_losing_anything(tmp_path, llm_server):
    llm_server.reset()
    cfg = openai_cfg(llm_server, checkpoint_every=3)
    reference = all_pairs_layout(tmp_path / "reference")
    annotate_pairs(cfg, reference, "run-1")

    layout = all_pairs_layout(tmp_path / "killed")
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(layout.root), "12", json.dumps(cfg.model_dump(mode="json"))],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not layout.annotations.exists()
    committed = RecordStore(next(layout.annotation_records.iterdir())).load(
        sorted({pid[:2] for pid in read(layout.pairs).column("pair_id").to_pylist()})
    )
    assert len(committed) >= 12
    accepted = Counter(k[1] for k, r in committed.items() if r["status"] == "accepted")

    llm_server.reset()
    stats = annotate_pairs(cfg, layout, "run-1")
    check_outputs(layout, cfg, stats)
    # 42 pairs have readable images; each committed acceptance is not asked again.
    assert len(llm_server.chat_requests("describe")) == 42 - accepted["describe"]
    assert len(llm_server.chat_requests("instruct")) == 42 - accepted["instruct"]
    assert read(layout.annotations).equals(read(reference.annotations))
    resumed, uninterrupted = (
        [{**r, "detail": r["detail"].replace(str(run.root), "<run>")} for r in read(run.failures_part("annotate")).to_pylist()]
        for run in (layout, reference)
    )
    assert resumed == uninterrupted


def test_work_items_can_run_in_any_order_then_finalize(tmp_path):
    cfg = make_cfg(pairs_per_task=10)
    reference = all_pairs_layout(tmp_path / "reference")
    expected = annotate_pairs(cfg, reference, "run-1")

    layout = all_pairs_layout(tmp_path / "mapped")
    items = plan_annotate_work(cfg, layout)
    assert len(items) == expected["work_items"] > 1 and json.loads(json.dumps(items)) == items
    assert sum(i["pairs"] for i in items) == 56
    assert all(a["last"] < b["first"] for a, b in zip(items, items[1:]))
    with pytest.raises(ItemsNotDone, match="6 of 6 work item\(s\) not done"):
        finalize_annotate(cfg, layout, "run-1")
    for item in reversed(items):
        out = run_annotate_work(cfg, layout, item, "run-1")
        assert out["pairs"] == item["pairs"] and out["accepted"] + out["failed"] == item["pairs"]
    stats = finalize_annotate(cfg, layout, "run-1")
    assert read(layout.annotations).equals(read(reference.annotations))
    assert {k: stats[k] for k in ("accepted", "failed", "failures_by_reason")} == {
        k: expected[k] for k in ("accepted", "failed", "failures_by_reason")
    }


def test_api_key_never_reaches_logs_outputs_or_stats(tmp_path, llm_server, monkeypatch, caplog):
    key = "sk-stage-SECRET-7f3a9c"
    monkeypatch.setenv("STAGE_TEST_KEY", key)
    caplog.set_level(logging.DEBUG)
    llm_server.reset()
    llm_server.api_key = key
    layout = write_inputs(tmp_path / "run")
    cfg = openai_cfg(llm_server, {"api_key_env": "STAGE_TEST_KEY", "http_attempts": 2})
    llm_server.set_fault_mix({"http_500": 0.2, "malformed": 0.1, "refusal": 0.1}, seed=1)
    stats = annotate_pairs(cfg, layout, "run-1")
    assert stats["accepted"] > 0 and llm_server.chat_requests()[0].headers["Authorization"] == f"Bearer {key}"
    secret = key.encode()
    for path in layout.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret not in data, path
            if path.suffix == ".parquet":  # compressed: look inside too
                assert key not in str(pq.read_table(path).to_pylist()), path
    assert key not in json.dumps(stats) and key not in caplog.text
    assert key not in json.dumps(cfg.model_dump(mode="json"))  # what would become task params
    llm_server.reset()


def test_annotate_config_keys_validate_with_one_line_errors():
    with pytest.raises(ConfigError, match=r"annotate: .*max_attempts_across_runs \(2\) must be >= max_attempts \(3\)"):
        make_cfg(max_attempts_across_runs=2)
    with pytest.raises(ConfigError, match="annotate.describe.image_transport"):
        make_cfg(describe={"image_transport": "ftp"})
    with pytest.raises(ConfigError, match="needs 'base_url'.*or 'connection_id'"):
        make_cfg(describe={"backend": "openai", "model": "m"})
    with pytest.raises(ConfigError, match="annotate.checkpoint_every"):
        make_cfg(checkpoint_every=0)
    cfg = make_cfg(describe={"backend": "openai", "model": "m", "connection_id": "mllm", "structured_output": True})
    assert cfg.annotate.describe.connection_id == "mllm" and cfg.annotate.describe.base_url is None


def test_shipped_profiles_parse_with_the_paper_models():
    from megapairs_ops.config import load_config

    paper = load_config(REPO / "configs" / "megapairs.yaml").annotate
    assert paper.describe.model == "OpenGVLab/InternVL2-26B" and paper.instruct.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert paper.word_num == (60, 100) and paper.n_demos == 5 and paper.min_instructions == 3
    assert paper.describe.image_max_side == 512 and paper.instruct.structured_output
    demo = load_config(REPO / "configs" / "demo.yaml").annotate
    assert demo.describe.backend == demo.instruct.backend == "template"


def test_no_pairs_gives_empty_outputs(layout):
    pq.write_table(read(layout.pairs).schema.empty_table(), layout.pairs)
    cfg = make_cfg()
    assert plan_annotate_work(cfg, layout) == []
    stats = annotate_pairs(cfg, layout, "run-1")
    assert (stats["pairs_in"], stats["accepted"], stats["failed"], stats["work_items"]) == (0, 0, 0, 0)
    check_outputs(layout, cfg, stats)
