"""End to end through the CLI: the acceptance corpus of real, partly broken images, re-runs that
skip finished stages, and a half-written stage that is redone."""

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from megapairs_ops.cli import main
from megapairs_ops.storage import RunLayout, read_json

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


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
