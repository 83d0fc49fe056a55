"""End to end through the CLI: the acceptance corpus of real, partly broken images, re-runs that
skip finished stages, and a half-written stage that is redone."""

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from megapairs_ops.cli import main
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import read_json
from tests.fixtures.paths import DEMO


def _digest(layout: RunLayout) -> str:
    h = hashlib.sha256()
    for part in sorted(layout.triplets_dir.glob("part-*.parquet")):
        h.update(part.read_bytes())
    h.update(layout.triplets_jsonl.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def weird_run(weird_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("weird_run")
    code = main(["run", "--config", DEMO, "--corpus", str(weird_corpus.path), "--out", str(out)])
    return code, RunLayout(out)


@pytest.mark.slow
def test_broken_inputs_are_quarantined_with_reasons(weird_corpus, weird_run):
    code, layout = weird_run
    assert code == 0
    quarantine = pq.read_table(layout.quarantine).to_pylist()
    got = {os.path.relpath(r["path"], weird_corpus.path): r["reason"] for r in quarantine}
    for name, reason in weird_corpus.expected_quarantine.items():
        assert got.get(name) == reason, (name, got.get(name))
    assert all(r["detail"] for r in quarantine)


@pytest.mark.slow
def test_odd_but_valid_images_are_used_and_duplicate_collapsed(weird_corpus, weird_run):
    _, layout = weird_run
    images = pq.read_table(layout.images).to_pylist()
    by_name = {os.path.relpath(r["path"], weird_corpus.path): r for r in images}
    assert len(images) == weird_corpus.expected_images
    for name in weird_corpus.odd_valid:
        assert name in by_name, name
    keep, copy = weird_corpus.duplicate
    assert [os.path.relpath(p, weird_corpus.path) for p in by_name[keep]["duplicate_paths"]] == [copy]
    assert copy not in by_name
    # Every usable image was embedded by every encoder.
    for enc in ("visual_semantic", "visual_pattern", "caption"):
        ids = pq.read_table(layout.embedding_ids(enc)).column("image_id").to_pylist()
        assert sorted(ids) == sorted(r["image_id"] for r in images)


@pytest.mark.slow
def test_triplets_meet_the_released_format(weird_run):
    _, layout = weird_run
    stats = read_json(layout.stats)
    assert stats["complete"] and stats["triplets"] > 0
    rows = pq.read_table(layout.triplets_dir).to_pylist()
    assert len(rows) == stats["triplets"]
    assert len({(r["q_img"], r["t_img"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["hns"][0] == r["q_img"] and len(r["hns"]) == 6 and r["t_img"] not in r["hns"]
        assert len(set(r["q_text"])) >= 3 and r["q_img"] != r["t_img"]
        assert all(0.8 < s < 0.96 for s in r["sims"])
    # Every stage reports rows in and out.
    for key, record in stats["stages"].items():
        assert record["rows_in"] is not None and record["rows_out"] is not None, key


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_redoes_a_half_written_one(weird_corpus, weird_run, tmp_path):
    _, layout = weird_run
    before = _digest(layout)
    status_before = {p.name: p.read_bytes() for p in (layout.root / "_status").glob("*.json")}
    args = ["run", "--config", DEMO, "--corpus", str(weird_corpus.path), "--out", str(layout.root)]
    assert main(args) == 0
    assert _digest(layout) == before
    assert {p.name: p.read_bytes() for p in (layout.root / "_status").glob("*.json")} == status_before

    # A stage killed after writing output but before its status record is redone, and only the
    # stages downstream of it run again.
    layout.status("pairs").unlink()
    (layout.root / "pairs.parquet").write_bytes(b"half-written")
    assert main(args) == 0
    assert _digest(layout) == before
    assert layout.status("ingest").read_bytes() == status_before["ingest.json"]
    assert layout.status("pairs").read_bytes() != status_before["pairs.json"]


def test_until_stops_and_later_stage_refuses_without_upstream(sample_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(out), "--until", "ingest"]) == 0
    assert RunLayout(out).images.is_file() and not RunLayout(out).pairs.exists()
    code = main(["stage", "pairs", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(out)])
    assert code == 1
    assert "needs 'mine-visual_semantic' to finish first" in capsys.readouterr().err


def test_missing_corpus_is_one_line(tmp_path, capsys):
    code = main(["run", "--config", DEMO, "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


# -- temp outputs of killed runs ------------------------------------------------------------------

# What interrupted atomic writes leave (storage.atomic_path / atomic_dir), in every place a stage
# writes, and a DuckDB spill file of a killed process.
STALE = [
    "ingest/.images.parquet.k1l2.tmp",
    "quarantine/.ingest.parquet.x9.tmp",
    "embeddings/visual_semantic/.vectors.npy.a1b2.tmp",
    "work/embed-caption/parts/.shard-000001.shard.npz.c3.tmp",
    "work/mine-caption/parts/.q000000000000-000000000120.candidates.parquet.ab.tmp",
    "candidates/.caption.parquet.z1.tmp",
    "neighbours/.visual_pattern.json.q2.tmp",
    ".pairs.parquet.p0.tmp",
    "tmp/pairs/duckdb_temp_storage_DEFAULT-0.tmp",
    "work/ingest/parts/.files-000000000-000000120.images.parquet.i1.tmp",
    "annotations/records/.0000000001-r-77-000001.parquet.r8.tmp",
    "failures/.annotate.parquet.w3.tmp",
    ".triplets.9f8e.tmp/part-00000.parquet",
    ".triplets.old-4242-1234/part-00000.parquet",
    ".triplets.jsonl.77.tmp",
    ".manifest.json.m1.tmp",
    "reports/.thumbs.5d6e.tmp/0123456789abcdef.jpg",
    "reports/.index.html.1a.tmp",
    "reports/.stats.json.s1.tmp",
]


def test_temp_outputs_of_killed_stages_are_swept_when_they_run_again(sample_corpus, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(out)]
    assert main(args) == 0
    for rel in STALE:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"half-written")
    keep = out / "reports" / ".not-a-temp-file"
    keep.write_text("a curator's note")
    # Every stage runs again (as it would after a kill), and each sweeps what it owns.
    assert main([*args, "--force"]) == 0
    assert [rel for rel in STALE if (out / rel).exists()] == []
    assert not list(out.glob(".triplets.*")) and not list((out / "reports").glob(".thumbs.*"))
    assert keep.read_text() == "a curator's note"
    assert (out / "triplets" / "part-00000.parquet").is_file() and (out / "reports" / "thumbs").is_dir()


KILL_IN_THUMBNAILS = """
import os, signal, sys
from PIL import Image
from megapairs_ops.cli import main

save = Image.Image.save
def save_then_die(self, fp, *args, **kwargs):
    save(self, fp, *args, **kwargs)
    if ".thumbs." in str(fp):
        os.kill(os.getpid(), signal.SIGKILL)
Image.Image.save = save_then_die
sys.exit(main(["report", sys.argv[1]]))
"""


def test_a_report_killed_while_writing_thumbnails_leaves_no_temp_behind(sample_corpus, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    assert main(["run", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-c", KILL_IN_THUMBNAILS, str(out)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list((out / "reports").glob(".thumbs.*.tmp")), "the kill should have left the temp folder"
    assert main(["report", str(out)]) == 0
    assert not list((out / "reports").glob(".thumbs.*"))
    assert list((out / "reports" / "thumbs").glob("*.jpg"))


# -- a faulty model endpoint: nothing damaged publishes, a re-run retries the failures ------------

DAMAGE_REASONS = {"truncated", "content_filter", "template_token", "unclosed_json", "meta_language", "unfinished_sentence"}


def faulty_endpoint_config(tmp_path, llm_server) -> str:
    import yaml

    data = yaml.safe_load(Path(DEMO).read_text())
    step = {"backend": "openai", "model": "fake-mllm", "base_url": llm_server.base_url, "concurrency": 8,
            "backoff_s": 0.001, "max_backoff_s": 0.01, "image_max_side": 64}
    data["annotate"].update(describe=step, instruct=dict(step), max_attempts=2, max_attempts_across_runs=4)
    data["gates"]["failure_rate"] = {"max": 0.5, "severity": "fail"}
    data["gates"]["instruction_share"] = None  # the loopback server words its instructions alike
    path = tmp_path / "faulty.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_damaged_answers_never_publish_and_a_rerun_retries_them(sample_corpus, tmp_path, llm_server):
    from megapairs_ops.config import load_config
    from megapairs_ops.stages.annotate.checks import TextRules, check_annotation
    from tests.fixtures.llm_server import DAMAGED_ANSWERS

    config, out = faulty_endpoint_config(tmp_path, llm_server), tmp_path / "run"
    layout = RunLayout(out)
    args = ["run", "--config", config, "--corpus", str(sample_corpus), "--out", str(out)]
    llm_server.reset()
    llm_server.set_fault_mix({kind: 0.05 for kind in DAMAGED_ANSWERS}, seed=11)
    assert main(args) == 0
    assert {r.fault for r in llm_server.chat_requests()} >= set(DAMAGED_ANSWERS)

    cfg = load_config(config)
    rules = TextRules.from_config(cfg.annotate.checks)
    first = {r["pair_id"]: r for r in pq.read_table(layout.triplets_dir).to_pylist()}
    assert first
    for row in first.values():  # every published text passes every check, and shows no debris
        assert check_annotation(row["description"], row["q_text"], row["word_num"], cfg.annotate, rules) == ""
        text = " ".join([row["description"], *row["q_text"]])
        assert not any(bad in text for bad in ("<|", "{{{", "Image 2", "second picture", '{"'))
    failures = [r for r in pq.read_table(layout.failures).to_pylist() if r["stage"] == "annotate"]
    assert failures and {r["reason"] for r in failures} <= DAMAGE_REASONS
    assert not set(first) & {r["pair_id"] for r in failures}
    annotate = read_json(layout.status("annotate"))
    assert set(annotate["steps"]["describe"]["attempt_failures"]) == {"truncated", "content_filter", "template_token"}
    assert set(annotate["steps"]["instruct"]["attempt_failures"]) == DAMAGE_REASONS
    assert annotate["retryable_failures"] == len(failures)  # two tries of four spent on each
    report = (layout.reports_dir / "index.html").read_text()
    assert "Model answers rejected, by step" in report and "unclosed_json" in report

    # The endpoint is healthy again: a plain re-run asks only about the failed pairs, publishes
    # them beside the untouched earlier triplets, and records that nothing is left to retry.
    llm_server.reset()
    assert main(args) == 0
    need_describe = sum(r["detail"].startswith("describe:") for r in failures)
    assert len(llm_server.chat_requests("describe")) == need_describe
    assert len(llm_server.chat_requests("instruct")) == len(failures)
    second = {r["pair_id"]: r for r in pq.read_table(layout.triplets_dir).to_pylist()}
    assert set(second) == set(first) | {r["pair_id"] for r in failures}
    assert all(second[pid] == row for pid, row in first.items())
    assert read_json(layout.status("annotate"))["retryable_failures"] == 0
    assert read_json(out / "manifest.json")["triplets"] == len(second)

    # Nothing left to retry: the next re-run asks nothing and changes nothing.
    before = _digest(layout)
    llm_server.reset()
    assert main(args) == 0
    assert llm_server.chat_requests() == [] and _digest(layout) == before
