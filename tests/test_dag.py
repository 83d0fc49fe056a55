import json
import textwrap

import pyarrow.parquet as pq
import pytest

from megapairs_ops.storage import RunLayout, read_json
from tests.fixtures.airflow import REPO, run_airflow_python

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
        "annotate", "embed", "ingest", "mine", "mine_shard", "pairs", "plan_encoders", "plan_mining", "publish", "report"
    ]
    assert info["params"] == ["config", "corpus", "output_root", "run_name"]
    up = info["upstream"]
    assert up["embed"] == ["ingest", "plan_encoders"]
    assert up["plan_mining"] == ["embed"] and up["mine_shard"] == ["plan_mining"]
    assert up["mine"] == ["mine_shard", "plan_encoders"] and up["pairs"] == ["mine"]
    assert up["annotate"] == ["pairs"] and up["publish"] == ["annotate"] and up["report"] == ["publish"]
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
    assert routing["embed"] == ["gpu", "gpu"]
    assert routing["annotate"][1] == "llm"
    assert routing["ingest"][1] == "default_pool" and routing["pairs"][1] == "default_pool"


@pytest.mark.slow
def test_dag_test_runs_the_whole_pipeline_like_the_cli(airflow_home, sample_corpus, tmp_path):
    out_root = tmp_path / "runs"
    conf = {"corpus": str(sample_corpus), "config": "configs/demo.yaml",
            "output_root": str(out_root), "run_name": "dagrun"}
    code = textwrap.dedent(
        f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("d", {str(REPO / "dags" / "megapairs_synthesis.py")!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        from airflow.dag_processing.dagbag import DagBag
        dag = DagBag(dag_folder={str(REPO / "dags")!r}).get_dag("megapairs_synthesis")
        dr = dag.test(run_conf={conf!r})
        tis = {{f"{{ti.task_id}}[{{ti.map_index}}]": str(ti.state) for ti in dr.get_task_instances()}}
        print(json.dumps({{"state": str(dr.state), "tis": tis}}))
        """
    )
    proc = run_airflow_python(airflow_home, code)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "success", result
    # One mapped embed and mine task per encoder.
    assert sum(k.startswith("embed[") for k in result["tis"]) == 3
    assert sum(k.startswith("mine[") for k in result["tis"]) == 3
    assert sum(k.startswith("mine_shard[") for k in result["tis"]) >= 3

    dag_layout = RunLayout(out_root / "dagrun")
    stats = read_json(dag_layout.stats)
    assert stats["complete"] and stats["triplets"] > 0

    from megapairs_ops.cli import main

    cli_out = tmp_path / "cli"
    assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--corpus", str(sample_corpus),
                 "--out", str(cli_out)]) == 0
    drop = ["run_id"]
    dag_rows = pq.read_table(dag_layout.triplets_dir).drop_columns(drop).to_pylist()
    cli_rows = pq.read_table(RunLayout(cli_out).triplets_dir).drop_columns(drop).to_pylist()
    assert dag_rows == cli_rows
