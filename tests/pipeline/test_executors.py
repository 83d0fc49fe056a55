"""The two executors of one plan. What the DAG does for every stage: plan (a planner per device),
run each batch of work items on its own and in any order, then finalize; outputs and stats must
equal the CLI's, and the finalize step must neither load an encoder nor ask a model."""


import pyarrow.parquet as pq
import pytest

from megapairs_ops.cli import main
from megapairs_ops.layout import RunLayout
from megapairs_ops.pipeline import (
    all_stages,
    context_from_params,
    finalize_stage,
    plan_stage,
    run_batch,
    run_pipeline,
    run_stage,
    task_batches,
)
from megapairs_ops.stages.annotate import item as annotate_item_module
from megapairs_ops.stages.embed import shards as embed_shards_module
from megapairs_ops.stages.publish.catalogue import catalogue_path, open_catalogue
from megapairs_ops.storage import read_json
from tests.fixtures.paths import DEMO
from tests.fixtures.records import stable_record


def _no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the finalizing call must not load an encoder or build a model backend")

    monkeypatch.setattr(embed_shards_module, "build_encoder", refuse)
    monkeypatch.setattr(annotate_item_module, "make_backend", refuse)


def _mapped_run(ctx, monkeypatch, until: str = "annotate") -> None:
    """What the DAG does, in process: per stage, a planner per device, every batch (last first),
    then finalize per key without models."""
    for stage in all_stages():
        planned = {device: plan_stage(ctx, stage.name, device) for device in stage.devices}
        assert all(item["stage"] == stage.name for items in planned.values() for item in items)
        if stage.name == "embed":
            assert planned["gpu"] == []  # the demo's encoders are all CPU ones
            assert sorted({n for i in planned["cpu"] for n in i["encoders"]}) == sorted(e.name for e in ctx.cfg.encoders)
        for device, items in planned.items():
            for batch in reversed(task_batches(ctx, stage.name, items)):
                committed = run_batch(ctx, stage.name, batch)
                assert len(committed) == len(batch) and all(committed)
        with monkeypatch.context() as m:
            _no_models(m)
            for enc in ([e.name for e in ctx.cfg.encoders] if stage.per_encoder else [None]):
                record = finalize_stage(ctx, stage.name, enc)
                assert not record.get("skipped")
        assert all(plan_stage(ctx, stage.name, d) == [] for d in stage.devices)  # finished: no work
        if stage.name == until:
            return


def _compare(mapped: RunLayout, cli: RunLayout, stages: list[str]) -> None:
    for key in stages:
        assert (stable_record(read_json(mapped.status(key)), mapped.output_root)
                == stable_record(read_json(cli.status(key)), cli.output_root)), key
    assert pq.read_table(mapped.annotations).equals(pq.read_table(cli.annotations))
    assert pq.read_table(mapped.failures_part("annotate")).equals(pq.read_table(cli.failures_part("annotate")))


@pytest.mark.slow
def test_mapped_work_items_equal_the_cli(sample_corpus, tmp_path, monkeypatch):
    ctx = context_from_params(DEMO, sample_corpus, tmp_path / "mapped" / "run", run_id="r")
    _mapped_run(ctx, monkeypatch)
    cli = context_from_params(DEMO, sample_corpus, tmp_path / "cli" / "run", run_id="r")
    run_pipeline(cli, until="annotate", workers=2)
    stages = ["ingest", *(f"embed-{e.name}" for e in ctx.cfg.encoders), *(f"mine-{e.name}" for e in ctx.cfg.encoders),
              "pairs", "annotate"]
    _compare(ctx.layout, cli.layout, stages)
    ann = read_json(ctx.layout.status("annotate"))
    assert ann["reused"] == 0 and ann["accepted"] > 0 and ann["pairs_requested"] == ann["requests"]["describe"] > 0
    # A finished stage leaves no work dir behind.
    assert not (ctx.layout.root / "work").exists() or not any(
        (ctx.layout.root / "work" / key).exists() for key in ("ingest", "pairs", "annotate"))


@pytest.fixture()
def half_published(sample_corpus, tmp_path):
    """An output root whose catalogue holds about half of the corpus' published pairs."""
    root = tmp_path / "runs"
    assert main(["run", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(root / "v1")]) == 0
    cfg = context_from_params(DEMO, sample_corpus, root / "v1").cfg
    with open_catalogue(cfg, catalogue_path(cfg, RunLayout(root / "v1"))) as con:
        con.execute("DELETE FROM published_pairs WHERE pair_id >= '8'")
        left = con.execute("SELECT count(*) FROM published_pairs").fetchall()[0][0]
    assert left > 0
    return root


@pytest.mark.slow
def test_mapped_annotate_reuses_exactly_what_the_cli_reuses(sample_corpus, half_published, monkeypatch):
    root = half_published
    ctx = context_from_params(DEMO, sample_corpus, root / "mapped", run_id="r")
    _mapped_run(ctx, monkeypatch)
    cli = context_from_params(DEMO, sample_corpus, root / "cli", run_id="r")
    run_pipeline(cli, until="annotate")  # nothing published in between: the same catalogue
    _compare(ctx.layout, cli.layout, ["pairs", "annotate"])
    ann = read_json(ctx.layout.status("annotate"))
    assert 0 < ann["reused"] < ann["pairs_in"]
    assert ann["pairs_annotated"] == ann["pairs_in"] - ann["reused"] == ann["requests"]["describe"]


@pytest.mark.slow
def test_reuse_split_holds_from_planning_to_finalizing(sample_corpus, half_published, monkeypatch):
    """Another run publishing between the planning task and the finalizing one changes nothing:
    the merge reuses exactly the annotations the plan spared the models."""
    root = half_published
    ctx = context_from_params(DEMO, sample_corpus, root / "mapped", run_id="r")
    run_pipeline(ctx, until="pairs")
    items = plan_stage(ctx, "annotate", "cpu")
    assert items
    for batch in task_batches(ctx, "annotate", items):
        run_batch(ctx, "annotate", batch)
    with open_catalogue(ctx.cfg, catalogue_path(ctx.cfg, ctx.layout)) as con:
        planned_reuse = con.execute("SELECT count(*) FROM published_pairs").fetchall()[0][0]
        con.execute("DELETE FROM published_pairs")
    with monkeypatch.context() as m:
        _no_models(m)
        record = finalize_stage(ctx, "annotate")
    n_pairs = pq.ParquetFile(ctx.layout.pairs).metadata.num_rows
    assert record["reused"] == planned_reuse and record["pairs_annotated"] == n_pairs - planned_reuse
    assert record["accepted"] == pq.ParquetFile(ctx.layout.annotations).metadata.num_rows
    # Once the stage is finalized, a new execution asks the catalogue again (now empty).
    again = run_stage(ctx, "annotate", force=True)
    assert again["reused"] == 0 and again["accepted"] == record["accepted"]
