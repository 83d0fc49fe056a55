"""The mapped path the DAG takes through embed, mine and annotate: plan work items, run each on its own,
then run_stage finds them done and finalizes. Outputs and stats must equal the CLI's (one call per
stage), and the finalizing call must neither load an encoder nor ask a model."""

import pyarrow.parquet as pq
import pytest

from megapairs_ops.stages.annotate import work as annotate_module
from megapairs_ops.stages.embed import work as embed_module
from megapairs_ops.stages.publish.catalogue import catalogue_path, open_catalogue, run_annotate_item
from megapairs_ops.cli import main
from megapairs_ops.stages.embed.work import run_embed_work
from megapairs_ops.stages.mine.work import run_mining_work
from megapairs_ops.pipeline import (
    context_from_params,
    plan_annotate_stage,
    plan_embed_stage,
    plan_mine_stage,
    run_pipeline,
    run_stage,
)
from megapairs_ops.storage import RunLayout, read_json
from tests.test_pipeline import DEMO

# Stats that say what a stage did, not when or how fast.
VOLATILE = {"finished_at", "skipped", "run_id", "fingerprint"}


def _stable(record: dict) -> dict:
    def clean(value):
        if isinstance(value, dict):
            return {
                k: clean(v) for k, v in value.items()
                if k not in VOLATILE and not k.endswith("seconds") and "latency" not in k
            }
        return value

    return clean(record)


def _no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the finalizing call must not load an encoder or build a model backend")

    monkeypatch.setattr(embed_module, "build_encoder", refuse)
    monkeypatch.setattr(annotate_module, "make_backend", refuse)


def _mapped_run(ctx, monkeypatch, until: str = "annotate") -> None:
    """What the DAG does, in process: plan, every work item, then run_stage per stage."""
    run_stage(ctx, "ingest")
    assert plan_embed_stage(ctx, "gpu") == []  # the demo's encoders are all CPU ones
    items = plan_embed_stage(ctx, "cpu")
    assert items and all(i["device"] == "cpu" for i in items)
    assert sorted(n for i in items for n in i["encoders"]) == sorted(e.name for e in ctx.cfg.encoders)
    for item in reversed(items):
        run_embed_work(ctx.cfg, ctx.layout, item)
    with monkeypatch.context() as m:
        _no_models(m)
        for enc in ctx.cfg.encoders:
            run_stage(ctx, "embed", enc.name)
    assert plan_embed_stage(ctx) == []  # finished stages plan no work
    names = [enc.name for enc in ctx.cfg.encoders]
    items = plan_mine_stage(ctx, names)
    assert sorted({i["encoder"] for i in items}) == sorted(names)
    for item in reversed(items):
        run_mining_work(ctx.cfg, ctx.layout, item)
    for name in names:
        run_stage(ctx, "mine", name)
    assert plan_mine_stage(ctx, names) == []
    run_stage(ctx, "pairs")
    items = plan_annotate_stage(ctx)
    for item in reversed(items):
        run_annotate_item(ctx.cfg, ctx.layout, item, ctx.run_id)
    with monkeypatch.context() as m:
        _no_models(m)
        run_stage(ctx, "annotate")
    assert plan_annotate_stage(ctx) == []


def _compare(mapped: RunLayout, cli: RunLayout, stages: list[str]) -> None:
    for key in stages:
        assert _stable(read_json(mapped.status(key))) == _stable(read_json(cli.status(key))), key
    assert pq.read_table(mapped.annotations).equals(pq.read_table(cli.annotations))
    assert pq.read_table(mapped.failures_part("annotate")).equals(pq.read_table(cli.failures_part("annotate")))


@pytest.mark.slow
def test_mapped_embed_and_annotate_equal_the_cli(sample_corpus, tmp_path, monkeypatch):
    ctx = context_from_params(DEMO, sample_corpus, tmp_path / "mapped" / "run", run_id="r")
    _mapped_run(ctx, monkeypatch)
    cli = context_from_params(DEMO, sample_corpus, tmp_path / "cli" / "run", run_id="r")
    run_pipeline(cli, until="annotate")
    stages = ["ingest", *(f"embed-{e.name}" for e in ctx.cfg.encoders), "pairs", "annotate"]
    _compare(ctx.layout, cli.layout, stages)
    ann = read_json(ctx.layout.status("annotate"))
    assert ann["reused"] == 0 and ann["accepted"] > 0 and ann["pairs_requested"] == ann["requests"]["describe"] > 0


@pytest.fixture()
def half_published(sample_corpus, tmp_path):
    """An output root whose catalogue holds about half of the corpus' published pairs."""
    root = tmp_path / "runs"
    assert main(["run", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(root / "v1")]) == 0
    cfg = context_from_params(DEMO, sample_corpus, root / "v1").cfg
    with open_catalogue(catalogue_path(cfg, RunLayout(root / "v1"))) as con:
        con.execute("DELETE FROM published_pairs WHERE pair_id >= '8'")
        left = con.execute("SELECT count(*) FROM published_pairs").fetchone()[0]
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
    run_stage(ctx, "ingest")
    for enc in ctx.cfg.encoders:
        run_stage(ctx, "embed", enc.name)
        run_stage(ctx, "mine", enc.name)
    run_stage(ctx, "pairs")
    items = plan_annotate_stage(ctx)
    assert items and all(i["source"] == "to_annotate" for i in items)
    for item in items:
        run_annotate_item(ctx.cfg, ctx.layout, item, ctx.run_id)
    with open_catalogue(catalogue_path(ctx.cfg, ctx.layout)) as con:
        planned_reuse = con.execute("SELECT count(*) FROM published_pairs").fetchone()[0]
        con.execute("DELETE FROM published_pairs")
    with monkeypatch.context() as m:
        _no_models(m)
        record = run_stage(ctx, "annotate")
    n_pairs = pq.ParquetFile(ctx.layout.pairs).metadata.num_rows
    assert record["reused"] == planned_reuse and record["pairs_annotated"] == n_pairs - planned_reuse
    assert record["accepted"] == pq.ParquetFile(ctx.layout.annotations).metadata.num_rows
    # Once the stage is finalized, a new execution asks the catalogue again (now empty).
    again = run_stage(ctx, "annotate", force=True)
    assert again["reused"] == 0 and again["accepted"] == record["accepted"]
