"""The distributed deployment, for real: Postgres metadata DB, CeleryExecutor on the Redis broker,
a CPU worker and a `gpu`-queue worker, scheduler, dag-processor and api-server as processes
(tests/fixtures/deployment.py). A run triggered through the REST API survives the SIGKILL of the
worker running one of its tasks; `airflow backfill create` of two dates writes two partitions.
Postgres and Redis run on every machine of this project: when they cannot be reached (or
started), these tests fail, saying how to start them."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from megapairs_ops.layout import RunLayout
from megapairs_ops.sample_corpus import generate_sample_corpus
from tests.fixtures.deployment import (
    DAG_ID,
    REDIS_HOST,
    REDIS_PORT,
    REPO,
    Deployment,
    ServiceUnavailable,
    deployment_processes,
    ensure_services,
)

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

CONFIG = str(REPO / "configs" / "demo.yaml")
# The mapped annotation work item: the task that calls the models.
KILLED_TASK = "annotate.items_cpu"


@dataclass
class Cluster:
    dep: Deployment
    backfill_id: int
    backfill_dates: list[str]
    manual_runs: list[str] = field(default_factory=list)


def published_pair_ids(run_dir: Path) -> list[str]:
    return pq.read_table(RunLayout(run_dir).triplets_dir, columns=["pair_id"]).column("pair_id").to_pylist()


def partition_of(logical_date: str) -> str:
    return datetime.fromisoformat(logical_date.replace("Z", "+00:00")).strftime("%Y-%m-%d")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deploy_corpus")
    generate_sample_corpus(root, n=80, seed=11)
    return root


@pytest.fixture(scope="module")
def reference_pairs(corpus, tmp_path_factory) -> set[str]:
    """What a plain CLI run publishes on the same corpus: every Airflow run must publish exactly this."""
    from megapairs_ops.cli import main

    out = tmp_path_factory.mktemp("deploy_reference") / "run"
    assert main(["run", "--config", CONFIG, "--corpus", str(corpus), "--out", str(out)]) == 0
    ids = published_pair_ids(out)
    assert ids and len(ids) == len(set(ids))
    return set(ids)


def _assert_torn_down(dep: Deployment) -> None:
    import psycopg2
    import redis

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dep.database,))
            assert cur.fetchone() is None, f"database {dep.database} survived the teardown"
    finally:
        conn.close()
    if dep.redis_db is not None:
        assert redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=dep.redis_db).dbsize() == 0, "Redis DB not flushed"
    alive = [p.pid for p in deployment_processes(dep.root)]
    assert not alive, f"processes survived the teardown: {alive}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, corpus) -> Cluster:
    try:
        ensure_services()
    except ServiceUnavailable as exc:
        pytest.fail(f"the deployment test needs the machine's PostgreSQL and Redis:\n{exc}", pytrace=False)
    dep = Deployment(tmp_path_factory.mktemp("deployment"), corpus)
    try:
        dep.start()
        # The backfill is created while the DAG is still paused, for the two latest dates. Its run
        # on the latest date takes the place of the scheduled run the scheduler would start when
        # the DAG is switched on, so no run beyond those under test appears. It stays paused until
        # the killed-worker test is over, so the kill hits only the task it aims at.
        latest = dep.dag()["next_dagrun_logical_date"]
        assert latest, f"{DAG_ID} has no schedule; backfills need one (MEGAPAIRS_SCHEDULE)"
        since = (datetime.fromisoformat(latest.replace("Z", "+00:00")) - timedelta(days=60)).isoformat()
        dates = dep.backfill_dates(since, latest)[-2:]
        assert len(dates) == 2, dates
        dep.cli("backfill", "create", "--dag-id", DAG_ID, "--from-date", dates[0], "--to-date", dates[1],
                "--max-active-runs", "2", "--dag-run-conf", '{"corpus": "%s", "config": "%s"}' % (corpus, CONFIG))
        (backfill,) = dep.backfills()
        dep.set_backfill_paused(backfill["id"], True)
        dep.unpause()
        yield Cluster(dep=dep, backfill_id=backfill["id"], backfill_dates=dates)
    finally:
        try:
            dep.stop()
        finally:
            _assert_torn_down(dep)


def test_rest_triggered_run_survives_a_killed_worker(reference_pairs, cluster, corpus):
    dep = cluster.dep
    run_id = f"rest_kill_{secrets.token_hex(3)}"
    cluster.manual_runs.append(run_id)
    (dep.hooks / run_id).mkdir()
    (dep.hooks / run_id / f"{KILLED_TASK}.request").touch()  # its first try blocks until killed
    conf = {"corpus": str(corpus), "config": CONFIG, "output_root": str(dep.output_root)}
    assert dep.trigger(conf, run_id=run_id) == run_id

    blocked = dep.hooks / run_id / f"{KILLED_TASK}.blocked"
    dep.wait_for(blocked.exists, 600, f"the first try of {KILLED_TASK} in {run_id}")
    killed = json.loads(blocked.read_text())
    assert killed["map_index"] >= 0  # a mapped work item
    assert dep.kill_worker_of(killed["pid"]) == "worker-cpu"
    dep.start_worker("worker-cpu-2", "default")
    # The kill is done: the backfill may share the workers from now on (it runs while the
    # scheduler waits out the lost task's heartbeat and retry delay).
    dep.set_backfill_paused(cluster.backfill_id, False)

    assert dep.wait_run(run_id, timeout=900)["state"] == "success"
    tries = dep.tries(run_id, KILLED_TASK, killed["map_index"])
    assert [t["try_number"] for t in tries] == [1, 2], tries
    assert tries[0]["state"] != "success" and tries[1]["state"] == "success", tries

    tis = {(ti["task_id"], ti["map_index"]): ti for ti in dep.task_instances(run_id)}
    # The demo's encoders and models are CPU ones: no GPU work item, so every stage's GPU items
    # task is skipped (one unexpanded instance each) and everything else succeeded.
    gpu_items = {key: ti for key, ti in tis.items() if key[0].endswith(".items_gpu")}
    assert sorted(task for task, _ in gpu_items) == ["annotate.items_gpu", "embed.items_gpu", "mine.items_gpu"]
    assert all(key[1] == -1 and ti["state"] == "skipped" for key, ti in gpu_items.items()), gpu_items
    assert all(ti["state"] == "success" for key, ti in tis.items() if key not in gpu_items), tis
    # Routing from the stage declarations and the deployment settings: CPU embedding work stays
    # off the `gpu` queue and pool, GPU work would go there; the model calls, and only they, hold
    # the `llm` pool.
    cpu_shards = [ti for (task, _), ti in tis.items() if task == "embed.items_cpu"]
    # One task runs both CPU embed items (the image group and the text view: one shard each).
    assert len(cpu_shards) == 1 and all((ti["queue"], ti["pool"]) == ("default", "default_pool") for ti in cpu_shards)
    gpu_embed = tis[("embed.items_gpu", -1)]
    assert (gpu_embed["queue"], gpu_embed["pool"]) == ("gpu", "gpu")
    # The per-encoder finalize is mapped over the demo's three encoders.
    assert len([key for key in tis if key[0] == "embed.finalize"]) == 3
    annotate_items = [ti for (task, _), ti in tis.items() if task.startswith("annotate.items_")]
    assert annotate_items and all(ti["pool"] == "llm" for ti in annotate_items)
    assert {ti["pool"] for (task, _), ti in tis.items() if not task.startswith("annotate.items_")} <= {
        "default_pool", "gpu"}
    assert tis[(KILLED_TASK, killed["map_index"])]["try_number"] == 2
    assert tis[("ingest.items_cpu", 0)]["queue"] == "default"
    assert tis[("ingest.plan_cpu", -1)]["queue"] == "default"

    ids = published_pair_ids(dep.output_root / run_id)  # manual runs: partition = run id
    assert len(ids) == len(set(ids)), "duplicate pairs after the retry"
    assert set(ids) == reference_pairs


def test_backfill_of_two_dates_writes_two_partitions(reference_pairs, cluster):
    dep = cluster.dep
    dep.set_backfill_paused(cluster.backfill_id, False)  # already, unless the test before failed early
    runs = dep.dag_runs(run_type="backfill")
    assert sorted(r["logical_date"] for r in runs) == sorted(cluster.backfill_dates)
    for run in runs:
        dep.wait_run(run["dag_run_id"], timeout=900)

    partitions = {partition_of(d) for d in cluster.backfill_dates}
    assert len(partitions) == 2
    # Nothing else was written: no scheduled run beside the backfill, no partition under another name.
    written = {p.name for p in dep.output_root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert written == partitions | set(cluster.manual_runs), "backfill runs must write OUTPUT_ROOT/<logical date>"
    for name in partitions:
        ids = published_pair_ids(dep.output_root / name)
        assert len(ids) == len(set(ids)), f"duplicate pairs in partition {name}"
        assert set(ids) == reference_pairs, name
    assert {r["run_type"] for r in dep.dag_runs()} <= {"backfill", "manual"}
