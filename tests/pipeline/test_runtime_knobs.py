"""Runtime knobs never invalidate a result: on a finished run, changing how a stage's work runs
(batch sizes, items per task, concurrency, timeouts, endpoints, memory limits, devices, the
process pool) re-runs nothing, stage by stage. Changing what defines a result does re-run, from
that stage on (the control: the spies below do see a re-run)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline import all_stages, context_from_params, run_pipeline
from megapairs_ops.storage import read_json
from tests.fixtures.paths import DEMO

# One set of runtime knobs per stage: each is a setting that stage reads while it works.
KNOBS: dict[str, list[tuple[str, Any]]] = {
    "ingest": [("ingest.shard_size", 7), ("ingest.shards_per_task", 3)],
    "embed": [("encoders.0.batch_size", 5), ("encoders.2.device", "cpu"), ("embed.shard_size", 11),
              ("embed.shards_per_task", 1), ("embed.decode_workers", 1), ("embed.share_decode", False),
              ("embed.cache", False)],
    "mine": [("mining.query_batch_size", 3), ("mining.queries_per_task", 10), ("mining.memory_budget", "512MB"),
             ("mining.device", "cpu"), ("mining.shard_rows", 16)],
    "pairs": [("duckdb.memory_limit", "300MB"), ("duckdb.threads", 1), ("duckdb.temp_directory", "spill")],
    "annotate": [("annotate.describe.concurrency", 2), ("annotate.instruct.timeout_s", 7.5),
                 ("annotate.describe.base_url", "http://127.0.0.1:9/v1"), ("annotate.pairs_per_task", 4),
                 ("annotate.batch_size", 3), ("annotate.checkpoint_every", 2)],
    "publish": [("duckdb.memory_limit", "256MB"), ("duckdb.threads", 2)],
}


def _set(doc: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value


def _config(tmp_path: Path, changes: list[tuple[str, Any]]) -> str:
    doc = yaml.safe_load(Path(DEMO).read_text())
    for dotted, value in changes:
        _set(doc, dotted, value)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(sample_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("knobs") / "run"
    ctx = context_from_params(DEMO, sample_corpus, out)
    assert run_pipeline(ctx)["complete"]
    return out


def _statuses(layout: RunLayout) -> dict[str, dict]:
    return {p.stem: read_json(p) for p in sorted(layout.status("ingest").parent.glob("*.json"))}


def _spy_on_stages(monkeypatch) -> list[str]:
    """Every stage's plan, item work and finalize, recorded instead of run."""
    calls: list[str] = []
    for stage in all_stages():
        cls = type(stage)
        for method in ("plan", "run_items", "finalize"):
            original = getattr(cls, method)

            def spy(self, *args, _original=original, _what=f"{stage.name}.{method}", **kwargs):
                calls.append(_what)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, spy)
    return calls


def _copy(run: Path, tmp_path: Path) -> RunLayout:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)  # copy2: the statuses and outputs keep their mtimes
    return RunLayout(dest)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KNOBS))
def test_changing_a_runtime_knob_on_a_finished_run_reruns_nothing(stage, finished_run, sample_corpus, tmp_path,
                                                                  monkeypatch):
    layout = _copy(finished_run, tmp_path)
    before = _statuses(layout)
    assert "publish" in before and all(s["state"] == "done" for s in before.values())
    triplets = {p: p.stat().st_mtime_ns for p in layout.triplets_dir.glob("*.parquet")}

    ctx = context_from_params(_config(tmp_path, KNOBS[stage]), sample_corpus, layout.root)
    calls = _spy_on_stages(monkeypatch)
    stats = run_pipeline(ctx, workers=2)

    assert calls == [], f"changing {[k for k, _ in KNOBS[stage]]} re-ran {calls}"
    assert stats["complete"]
    assert _statuses(layout) == before
    assert {p: p.stat().st_mtime_ns for p in layout.triplets_dir.glob("*.parquet")} == triplets


# What defines a result, per stage: the stage and everything after it runs again.
RESULT_CHANGES = {
    "mine": [("mining.k", 15)],
    "annotate": [("annotate.word_num", [50, 90])],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(RESULT_CHANGES))
def test_changing_what_defines_a_result_reruns_from_that_stage(stage, finished_run, sample_corpus, tmp_path,
                                                               monkeypatch):
    layout = _copy(finished_run, tmp_path)
    ctx = context_from_params(_config(tmp_path, RESULT_CHANGES[stage]), sample_corpus, layout.root)
    calls = _spy_on_stages(monkeypatch)
    assert run_pipeline(ctx)["complete"]
    names = [s.name for s in all_stages()]
    rerun = [n for n in names if f"{n}.finalize" in calls]
    assert rerun == names[names.index(stage):], calls
