from datetime import datetime, timezone

from megapairs_ops.deployment import REPO, deployment_settings, partition_name


def test_defaults_and_environment_overrides(tmp_path):
    s = deployment_settings({})
    assert s.schedule == "@weekly" and s.max_active_runs == 1 and s.retries >= 1
    assert s.default_config == str(REPO / "configs" / "demo.yaml")
    assert (s.gpu_queue, s.gpu_pool, s.llm_pool) == ("default", "default_pool", "default_pool")

    paper = deployment_settings({"MEGAPAIRS_CONFIG": str(REPO / "configs" / "megapairs.yaml")})
    assert (paper.gpu_queue, paper.gpu_pool, paper.llm_pool) == ("gpu", "gpu", "llm")

    s = deployment_settings({"MEGAPAIRS_SCHEDULE": "none", "MEGAPAIRS_GPU_POOL": "a100", "MEGAPAIRS_CONFIG": "/nope.yaml"})
    assert s.schedule is None and s.gpu_pool == "a100" and s.gpu_queue == "gpu"


def test_partitions_never_collide():
    day = datetime(2026, 3, 2, tzinfo=timezone.utc)
    assert partition_name("scheduled__2026-03-02T00:00:00+00:00", "scheduled", day) == "2026-03-02"
    assert partition_name("backfill__2026-03-02T00:00:00+00:00", "backfill", day) == "2026-03-02"
    from airflow.sdk.api.datamodels._generated import DagRunType

    # What a task actually sees: an enum whose str() is not its value.
    assert partition_name("backfill__x", DagRunType.BACKFILL, day) == "2026-03-02"
    assert partition_name("scheduled__x", DagRunType.SCHEDULED, day) == "2026-03-02"
    hourly = datetime(2026, 3, 2, 6, tzinfo=timezone.utc)
    assert partition_name("scheduled__x", "scheduled", hourly) == "2026-03-02T06-00-00"
    assert partition_name("manual__2026-03-02T10:11:12+00:00", "manual", day) == "manual__2026-03-02T10_11_12_00_00"
    assert partition_name("manual__x", "manual", None, run_name="demo") == "demo"


def test_pool_specs_skip_airflow_default_pool():
    from megapairs_ops.config import load_config
    from megapairs_ops.deployment import pool_specs

    assert pool_specs(load_config(REPO / "configs" / "demo.yaml").resources) == []
    specs = pool_specs(load_config(REPO / "configs" / "megapairs.yaml").resources)
    assert [(n, s) for n, s, _ in specs] == [("gpu", 1), ("llm", 4)]
