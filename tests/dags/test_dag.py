import json
import re
import textwrap

import pyarrow.parquet as pq
import pytest

from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import read_json
from tests.fixtures.airflow import REPO, run_airflow_python
from tests.fixtures.corpus import GROWN_NEW
from tests.fixtures.records import stable_record

HEAVY = ["torch", "faiss", "transformers", "great_expectations", "duckdb", "polars", "PIL", "megapairs_ops.config",
         "megapairs_ops.pipeline.runner", "megapairs_ops.storage"]
STAGES = [("ingest", False, ["cpu"]), ("embed", True, ["gpu", "cpu"]), ("mine", True, ["gpu", "cpu"]),
          ("pairs", False, ["cpu"]), ("annotate", False, ["gpu", "cpu"]), ("publish", False, ["cpu"])]


def _dag_info(airflow_home, env: dict | None = None) -> dict:
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
            "routing": {{t.task_id: [t.queue, t.pool] for t in dag.tasks}},
            "mapped": sorted(t.task_id for t in dag.tasks if t.is_mapped),
            "trigger_rules": {{t.task_id: str(getattr(t.trigger_rule, "value", t.trigger_rule)) for t in dag.tasks}},
            "teardowns": sorted(t.task_id for t in dag.tasks if t.is_teardown),
            "outlets": [getattr(o, "name", None) for o in dag.get_task("publish.finalize").outlets],
        }}))
        """
    )
    import os

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        proc = run_airflow_python(airflow_home, code)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dag_is_generated_from_the_stage_declarations_in_one_shape(airflow_home):
    info = _dag_info(airflow_home)
    assert info["errors"] == {}
    assert info["dags"] == ["megapairs_synthesis"]
    expected = {"check_config", "report"}
    for stage, _, devices in STAGES:
        expected |= {f"{stage}.plan_{d}" for d in devices} | {f"{stage}.items_{d}" for d in devices}
        expected.add(f"{stage}.finalize")
    assert set(info["tasks"]) == expected
    assert info["params"] == ["config", "corpus", "output_root", "run_name"]
    up = info["upstream"]
    before = "check_config"
    for stage, per_encoder, devices in STAGES:
        for d in devices:
            # Each planner takes what the stage before it finished; each item task its planner's batches.
            assert up[f"{stage}.plan_{d}"] == [before], stage
            assert up[f"{stage}.items_{d}"] == [f"{stage}.plan_{d}"], stage
        # Finalize takes its items' results (and the encoders it maps over).
        items = [f"{stage}.items_{d}" for d in devices]
        assert up[f"{stage}.finalize"] == sorted(items + (["check_config"] if per_encoder else [])), stage
        before = f"{stage}.finalize"
    assert up["report"] == ["publish.finalize"]
    # Work items fan out; the per-encoder finalizes merge and gate one encoder each.
    assert info["mapped"] == sorted([f"{s}.items_{d}" for s, _, ds in STAGES for d in ds]
                                    + [f"{s}.finalize" for s, per, _ in STAGES if per])
    # A device without work items leaves its mapped task skipped: the finalize after it must still
    # run, and must not when something failed.
    rules = info["trigger_rules"]
    finals = {f"{s}.finalize" for s, _, _ in STAGES}
    assert all(rules[t] == "none_failed" for t in finals)
    assert {t for t, r in rules.items() if r == "all_success"} == set(info["tasks"]) - finals - {"report"}
    # The report runs whatever happened before it, and does not decide the run's state: a teardown
    # (without setups its trigger rule waits for all upstream tasks, like all_done).
    assert info["teardowns"] == ["report"] and rules["report"] == "all_done_setup_success"
    # Parsing the DAG reads the declarations only: no stage code, no heavy library.
    assert info["heavy"] == []
    assert info["catchup"] is False and info["retries"] >= 1
    assert info["schedule"] == "@weekly" and info["max_active_runs"] == 1
    assert info["outlets"] == ["megapairs_triplets"]
    # The demo profile routes everything to Airflow's defaults.
    assert {tuple(qp) for qp in info["routing"].values()} == {("default", "default_pool")}


def test_routing_follows_the_stage_resources_and_the_default_profile(airflow_home):
    routing = _dag_info(airflow_home, {"MEGAPAIRS_CONFIG": str(REPO / "configs" / "megapairs.yaml")})["routing"]
    # Only work items on a GPU hold the GPU queue and pool; only the model calls hold the LLM pool.
    assert routing["embed.items_gpu"] == routing["mine.items_gpu"] == ["gpu", "gpu"]
    assert routing["annotate.items_gpu"] == ["gpu", "llm"] and routing["annotate.items_cpu"] == ["default", "llm"]
    others = {t: qp for t, qp in routing.items() if t not in ("embed.items_gpu", "mine.items_gpu", "annotate.items_gpu",
                                                               "annotate.items_cpu")}
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
    # One finalize per encoder for embed and mine; the demo's encoders are CPU ones, so the GPU
    # item tasks have nothing to do (skipped) and one CPU task runs every embed item (one shard:
    # the image group's and the text view's).
    assert _states(first, "embed.finalize") == ["success"] * 3 and _states(first, "mine.finalize") == ["success"] * 3
    assert _states(first, "embed.items_gpu") == ["skipped"] and _states(first, "mine.items_gpu") == ["skipped"]
    assert _states(first, "embed.items_cpu") == ["success"]
    assert _states(first, "mine.items_cpu") == ["success"] * 3
    assert set(_states(first, "annotate.items_cpu")) == {"success"} and _states(first, "annotate.finalize") == ["success"]
    # Mapped tasks are named in the UI by the work items they run.
    labels = {k.split("[")[0]: [] for k in first["labels"]}
    for key, label in first["labels"].items():
        labels[key.split("[")[0]].append(label)
    assert labels["embed.items_cpu"] == ["visual_semantic+visual_pattern@shard-000000..caption@shard-000000"]
    assert labels["ingest.items_cpu"] == ["files-000000000-000000120"]
    assert sorted(labels["embed.finalize"]) == ["caption", "visual_pattern", "visual_semantic"]
    assert all(re.fullmatch(r"[0-9a-f]{2}-[0-9a-f]{2}", label) for label in labels["annotate.items_cpu"]), labels

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
            assert stable_record(read_json(dag_run.status(key))) == stable_record(read_json(cli_run.status(key))), key
        dag_ann, cli_ann = (stable_record(read_json(run.status("annotate"))) for run in (dag_run, cli_run))
        assert dag_ann == cli_ann, dag_name
    reuse = read_json(RunLayout(out_root / "dagrun2").status("annotate"))
    assert reuse["reused"] == stats["triplets"] and reuse["pairs_annotated"] == reuse["pairs_in"] - reuse["reused"]

    # A finished partition run again: nothing to map, every stage skipped, the same triplets.
    assert again["state"] == "success", again
    item_tasks = {k for k in again["tis"] if ".items_" in k}
    assert {again["tis"][k] for k in item_tasks} == {"skipped"}
    assert {s for k, s in again["tis"].items() if k not in item_tasks} == {"success"}, again
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
    assert _states(broken, "ingest.plan_cpu") == ["failed"]
    for task in ("ingest.items_cpu", "ingest.finalize", "embed.items_cpu", "embed.finalize", "annotate.finalize",
                 "publish.finalize"):
        assert set(_states(broken, task)) == {"upstream_failed"}, (task, broken)
    assert _states(broken, "report") == ["success"]
