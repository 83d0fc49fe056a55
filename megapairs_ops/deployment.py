"""Deployment settings the DAG needs while it is parsed: schedule, retries, default params, and the
queues and pools of the default profile. Read from the environment and the default profile's
`resources` section with plain YAML, so DAG parsing stays light (no config model, no stage code).
The full config is still validated by every task before it does any work."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# Where a production deployment routes work (the `resources:` section's defaults, declared once
# here so that DAG parsing needs no config model).
RESOURCE_DEFAULTS = {"gpu_queue": "gpu", "gpu_pool": "gpu", "llm_pool": "llm"}


@dataclass(frozen=True)
class DeploymentSettings:
    schedule: str | None
    max_active_runs: int
    retries: int
    retry_delay_s: int
    default_config: str
    default_corpus: str
    output_root: str
    gpu_queue: str
    gpu_pool: str
    llm_pool: str


def deployment_settings(env: dict[str, str] | None = None) -> DeploymentSettings:
    env = dict(os.environ if env is None else env)
    config = env.get("MEGAPAIRS_CONFIG", str(REPO / "configs" / "demo.yaml"))
    resources = _profile_resources(config)
    schedule = env.get("MEGAPAIRS_SCHEDULE", "@weekly")
    return DeploymentSettings(
        schedule=None if schedule.lower() in ("", "none", "null") else schedule,
        max_active_runs=int(env.get("MEGAPAIRS_MAX_ACTIVE_RUNS", "1")),
        retries=int(env.get("MEGAPAIRS_RETRIES", "2")),
        retry_delay_s=int(env.get("MEGAPAIRS_RETRY_DELAY_S", "60")),
        default_config=config,
        default_corpus=env.get("MEGAPAIRS_CORPUS", str(REPO / "data" / "sample_corpus")),
        output_root=env.get("MEGAPAIRS_OUTPUT_ROOT", str(REPO / "runs")),
        gpu_queue=env.get("MEGAPAIRS_GPU_QUEUE", str(resources.get("gpu_queue"))),
        gpu_pool=env.get("MEGAPAIRS_GPU_POOL", str(resources.get("gpu_pool"))),
        llm_pool=env.get("MEGAPAIRS_LLM_POOL", str(resources.get("llm_pool"))),
    )


def _profile_resources(config: str) -> dict[str, str]:
    """The profile's queues and pools over the defaults. A profile that cannot be read gives the
    defaults: the task that validates the config reports the problem with a proper message."""
    try:
        section = (yaml.safe_load(Path(config).read_text()) or {}).get("resources") or {}
        return {**RESOURCE_DEFAULTS, **{k: str(v) for k, v in section.items()}}
    except (OSError, yaml.YAMLError, AttributeError):
        return dict(RESOURCE_DEFAULTS)


def partition_name(
    run_id: str, run_type: object, logical_date: datetime | None, run_name: str = ""
) -> str:
    """Where a DAG run writes: scheduled and backfill runs by logical date, so backfills of several
    dates never collide and re-running a date reuses (and atomically replaces) its partition;
    manual runs by run id; an explicit run name wins."""
    if run_name:
        return run_name
    # The task SDK hands a DagRunType enum whose str() is 'DagRunType.BACKFILL_JOB': compare values.
    run_type = getattr(run_type, "value", run_type)
    if run_type in ("scheduled", "backfill") and logical_date is not None:
        if (logical_date.hour, logical_date.minute, logical_date.second) == (0, 0, 0):
            return logical_date.strftime("%Y-%m-%d")
        return logical_date.strftime("%Y-%m-%dT%H-%M-%S")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)


def pool_specs(resources) -> list[tuple[str, int, str]]:
    """(name, slots, description) of the pools a profile routes to; Airflow's own default_pool is
    left alone. `resources` is a validated ResourcesConfig."""
    wanted = {
        resources.gpu_pool: (resources.gpu_pool_slots, "megapairs: GPU tasks (embedding) in parallel"),
        resources.llm_pool: (resources.llm_pool_slots, "megapairs: annotation tasks sharing the LLM servers"),
    }
    return [(name, slots, desc) for name, (slots, desc) in wanted.items() if name != "default_pool"]
