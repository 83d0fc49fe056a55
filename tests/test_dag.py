import json
import re
import textwrap

import pyarrow.parquet as pq
import pytest

from megapairs_ops.storage import RunLayout, read_json
from tests.fixtures.airflow import REPO, run_airflow_python
from tests.fixtures.corpus import GROWN_NEW

HEAVY = ["torch", "faiss", "transformers", "great_expectations", "duckdb", "polars", "megapairs_ops.pipeline"]


def test_dag_integrity_and_light_parsing(airflow_home):
    code = textwrap.dedent(
        f"""
        import json, sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(REPO / "dags")!r})
        dag = bag.get_dag("megapairs_synthesis")
        print(json.dumps({{
            "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
            "dags": sorted(bag.dag_ids),
            "tasks": sorted(dag.task_ids),
            "params": sorted(dag.params.keys()),
            "upstream": {{t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}},
            "heavy": [m for m in {HEAVY!r} if m in sys.modules],
            "catchup": dag.catchup,
            "retries": dag.default_args.get("retries"),
            "schedule": str(getattr(dag, "schedule", None)),
            "max_active_runs": dag.max_active_runs,
            "pools": {{t.task_id: t.pool for t in dag.tasks}},
            "queues": {{t.task_id: t.queue for t in dag.tasks}},
            "mapped": sorted(t.task_id for t in dag.tasks if t.is_mapped),
            "trigger_rules": {{t.task_id: str(getattr(t.trigger_rule, "value", t.trigger_rule)) for t in dag.tasks}},
            "teardowns": sorted(t.task_id for t in dag.tasks if t.is_teardown),
            "outlets": [getattr(o, "name", None) for o in dag.get_task("publish").outlets],
        }}))
        """
    )
    proc = run_airflow_python(airflow_home, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["errors"] == {}
    assert info["dags"] == ["megapairs_synthesis"]
    assert info["tasks"] == [
        "annotate", "annotate_pairs", "embed", "embed_cpu_shards", "embed_gpu_shards", "ingest", "mine", "mine_shard",
        "pairs", "plan_annotate", "plan_embed_cpu", "plan_embed_gpu", "plan_encoders", "plan_mining", "publish",
        "report",
    ]
    assert info["params"] == ["config", "corpus", "output_root", "run_name"]
    up = info["upstream"]
    assert up["ingest"] == ["plan_encoders"]
    assert up["plan_embed_gpu"] == up["plan_embed_cpu"] == ["ingest"]
    assert up["embed_gpu_shards"] == ["plan_embed_gpu"] and up["embed_cpu_shards"] == ["plan_embed_cpu"]
    assert up["embed"] == ["embed_cpu_shards", "embed_gpu_shards", "plan_encoders"]
    assert up["plan_mining"] == ["embed"] and up["mine_shard"] == ["plan_mining"]
    assert up["mine"] == ["mine_shard", "plan_encoders"] and up["pairs"] == ["mine"]
    assert up["plan_annotate"] == ["pairs"] and up["annotate_pairs"] == ["plan_annotate"]
    assert up["annotate"] == ["annotate_pairs"] and up["publish"] == ["annotate"] and up["report"] == ["publish"]
    # Work items fan out; the per-encoder and per-stage tasks after them merge, finalize and gate.
    assert info["mapped"] == ["annotate_pairs", "embed", "embed_cpu_shards", "embed_gpu_shards", "mine", "mine_shard"]
    # A device or stage without work items leaves its mapped task skipped: what follows it must
    # still run, and must not when something failed.
    rules = info["trigger_rules"]
    assert rules["embed"] == rules["mine"] == rules["annotate"] == "none_failed"
    assert {t for t, r in rules.items() if r == "all_success"} == set(info["tasks"]) - {"embed", "mine", "annotate", "report"}
    # The report runs whatever happened before it, and does not decide the run's state: a teardown
    # (without setups its trigger rule waits for all upstream tasks, like all_done).
    assert info["teardowns"] == ["report"] and rules["report"] == "all_done_setup_success"
    # Parsing the DAG must not pull in the pipeline's heavy libraries.
    assert info["heavy"] == []
    assert info["catchup"] is False and info["retries"] >= 1
    assert info["schedule"] == "@weekly" and info["max_active_runs"] == 1
    assert info["outlets"] == ["megapairs_triplets"]
    # The demo profile routes everything to Airflow's defaults.
    assert set(info["pools"].values()) == {"default_pool"}


def test_routing_follows_the_default_profile(airflow_home):
    code = textwrap.dedent(
        f"""
        import json
        from airflow.dag_processing.dagbag import DagBag
        dag = DagBag(dag_folder={str(REPO / "dags")!r}).get_dag("megapairs_synthesis")
        print(json.dumps({{t.task_id: [t.queue, t.pool] for t in dag.tasks}}))
        """
    )
    import os

    old = os.environ.get("MEGAPAIRS_CONFIG")
    os.environ["MEGAPAIRS_CONFIG"] = str(REPO / "configs" / "megapairs.yaml")
    try:
        proc = run_airflow_python(airflow_home, code)
    finally:
        if old is None:
            os.environ.pop("MEGAPAIRS_CONFIG")
        else:
            os.environ["MEGAPAIRS_CONFIG"] = old
    assert proc.returncode == 0, proc.stderr[-3000:]
    routing = json.loads(proc.stdout.strip().splitlines()[-1])
    # Only work on a GPU holds the GPU queue and pool; only the model calls hold the LLM pool.
    assert routing["embed_gpu_shards"] == ["gpu", "gpu"]
    assert routing["annotate_pairs"][1] == "llm"
    others = {task: qp for task, qp in routing.items() if task not in ("embed_gpu_shards", "annotate_pairs")}
    assert others and all(qp == ["default", "default_pool"] for qp in others.values()), others


def _dag_test_runs(airflow_home, confs: list[dict]) -> list[dict]:
    """dag.test() of each conf in turn, in one Airflow process: state and task states per run."""
    code = textwrap.dedent(
        f"""
        import json
        from airflow.dag_processing.dagbag import DagBag
        dag = DagBag(dag_folder={str(REPO / "dags")!r}).get_dag("megapairs_synthesis")
        results = []
        for conf in {confs!r}:
            dr = dag.test(run_conf=conf)
            tis = {{f"{{ti.task_id}}[{{ti.map_index}}]": str(ti.state) for ti in dr.get_task_instances()}}
            labels = {{f"{{ti.task_id}}[{{ti.map_index}}]": ti.rendered_map_index for ti in dr.get_task_instances()}}
            results.append({{"state": str(dr.state), "tis": tis, "labels": labels}})
        print(json.dumps(results))
        """
    )
    proc = run_airflow_python(airflow_home, code)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _states(result: dict, task: str) -> list[str]:
    return [state for key, state in result["tis"].items() if key.startswith(f"{task}[")]


@pytest.mark.slow
def test_dag_test_runs_the_whole_pipeline_like_the_cli(airflow_home, sample_corpus, grown_sample_corpus, tmp_path):
    from megapairs_ops.cli import main
    from tests.test_stage_work import _stable

    out_root = tmp_path / "runs"
    conf = {"corpus": str(sample_corpus), "config": "configs/demo.yaml",
            "output_root": str(out_root), "run_name": "dagrun"}
    # The first run; the same partition again (everything finished: nothing to map, nothing
    # redone); a second partition under the same output root, whose pairs were all published by
    # the first (the catalogue answers them); next week's run over the corpus grown by 10%; a run
    # that fails at ingest.
    first, again, second, grown, broken = _dag_test_runs(airflow_home, [
        conf, conf, {**conf, "run_name": "dagrun2"},
        {**conf, "run_name": "dagrun3", "corpus": str(grown_sample_corpus)},
        {**conf, "run_name": "broken", "corpus": str(tmp_path / "nope")},
    ])
    assert first["state"] == "success", first
    # One embed and mine task per encoder; the demo's encoders are CPU ones, so the GPU shard
    # task has nothing to do (skipped) and the CPU shard task runs the image group and the text view.
    assert _states(first, "embed") == ["success"] * 3 and _states(first, "mine") == ["success"] * 3
    assert _states(first, "embed_gpu_shards") == ["skipped"]
    assert _states(first, "embed_cpu_shards") == ["success"] * 2
    assert len(_states(first, "mine_shard")) >= 3
    assert set(_states(first, "annotate_pairs")) == {"success"} and _states(first, "annotate") == ["success"]
    # Mapped work items are named in the UI by what they do (the corpus is a single shard).
    labels = {k.split("[")[0]: [] for k in first["labels"]}
    for key, label in first["labels"].items():
        labels[key.split("[")[0]].append(label)
    assert sorted(labels["embed_cpu_shards"]) == ["caption@0-1", "visual_semantic+visual_pattern@0-1"]
    assert all(re.fullmatch(r"[0-9a-f]{2}-[0-9a-f]{2}", label) for label in labels["annotate_pairs"]), labels

    dag_layout = RunLayout(out_root / "dagrun")
    stats = read_json(dag_layout.stats)
    assert stats["complete"] and stats["triplets"] > 0

    cli_root = tmp_path / "cli"
    for name in ("cli", "cli2"):
        assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--corpus", str(sample_corpus),
                     "--out", str(cli_root / name)]) == 0
    drop = ["run_id"]
    for dag_name, cli_name in (("dagrun", "cli"), ("dagrun2", "cli2")):
        dag_run, cli_run = RunLayout(out_root / dag_name), RunLayout(cli_root / cli_name)
        dag_rows = pq.read_table(dag_run.triplets_dir).drop_columns(drop).to_pylist()
        cli_rows = pq.read_table(cli_run.triplets_dir).drop_columns(drop).to_pylist()
        assert dag_rows == cli_rows, dag_name
        # The mapped work finalizes into the same stage records as one CLI call per stage.
        for enc in ("visual_semantic", "visual_pattern", "caption"):
            key = f"embed-{enc}"
            assert _stable(read_json(dag_run.status(key))) == _stable(read_json(cli_run.status(key))), key
        dag_ann, cli_ann = (_stable(read_json(run.status("annotate"))) for run in (dag_run, cli_run))
        assert dag_ann == cli_ann, dag_name
    reuse = read_json(RunLayout(out_root / "dagrun2").status("annotate"))
    assert reuse["reused"] == stats["triplets"] and reuse["pairs_annotated"] == reuse["pairs_in"] - reuse["reused"]

    # A finished partition run again: nothing to map, every stage skipped, the same triplets.
    assert again["state"] == "success", again
    assert _states(again, "embed_cpu_shards") == ["skipped"] and _states(again, "annotate_pairs") == ["skipped"]
    assert _states(again, "mine_shard") == ["skipped"]
    assert {s for k, s in again["tis"].items() if not k.startswith(("embed_", "mine_shard", "annotate_pairs"))} == {
        "success"
    }, again
    assert second["state"] == "success", second

    # The grown corpus: only the new images are embedded and searched for, nothing published
    # before is sent to a model again, and the new version names its parent.
    assert grown["state"] == "success", grown
    v3 = RunLayout(out_root / "dagrun3")
    n_old = pq.read_metadata(dag_layout.images).num_rows
    assert read_json(v3.root / "manifest.json")["parent"] == "dagrun2"
    for enc in ("visual_semantic", "visual_pattern", "caption"):
        embedded = read_json(v3.status(f"embed-{enc}"))
        assert (embedded["computed"], embedded["reused"]) == (GROWN_NEW, n_old), enc
        mined = read_json(v3.status(f"mine-{enc}"))
        assert mined["mode"] == "incremental" and mined["incremental"]["new_queries"] == GROWN_NEW, mined
    published = {r["pair_id"] for name in ("dagrun", "dagrun2")
                 for r in pq.read_table(RunLayout(out_root / name).triplets_dir, columns=["pair_id"]).to_pylist()}
    pairs3 = {r["pair_id"] for r in pq.read_table(v3.pairs, columns=["pair_id"]).to_pylist()}
    ann = read_json(v3.status("annotate"))
    assert ann["reused"] == len(pairs3 & published) > 0
    assert ann["pairs_annotated"] == len(pairs3 - published) > 0
    assert ann["requests"]["describe"] == ann["pairs_annotated"]  # the template answers first time

    # A failure upstream of skippable mapped tasks still stops what follows and fails the run;
    # the report still runs.
    assert broken["state"] == "failed", broken
    assert _states(broken, "ingest") == ["failed"]
    for task in ("embed_cpu_shards", "embed", "annotate", "publish"):
        assert set(_states(broken, task)) == {"upstream_failed"}, (task, broken)
    assert _states(broken, "report") == ["success"]
