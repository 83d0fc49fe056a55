"""MegaPairs synthesis DAG: wiring only, generated from the stage declarations
(megapairs_ops/pipeline/registry.py). Every stage gets the same task group:

    <stage>.plan_<device>    the work items of the stage's unfinished keys (one planner per device
                             the stage declares), grouped into the batches one task runs
    <stage>.items_<device>   mapped over those batches, routed to the device's queue and pool
    <stage>.finalize         merge, gate, status (mapped over encoders for per-encoder stages)

The CLI (`megapairs run`) runs the same plan, items and finalize in one process (a process pool
for CPU-bound items). Each planner takes the previous stage's finalize results as its input, each
finalize the results of its items: data passes through return values. Parsing this file imports
the Airflow SDK, the deployment settings (environment + the default profile's `resources`) and
the light stage declarations; stage code and its heavy libraries load inside the tasks.

Scheduled and backfill runs write to OUTPUT_ROOT/<logical date>, manual runs to
OUTPUT_ROOT/<run id> (or OUTPUT_ROOT/<run_name> when given), so runs never collide and re-running a
date redoes only what changed in its own partition. Publishing updates the `megapairs_triplets`
asset, so a training DAG can be scheduled on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, TaskGroup, dag, get_current_context, task

from megapairs_ops.deployment import deployment_settings, partition_name
from megapairs_ops.pipeline.registry import all_stages

SETTINGS = deployment_settings()
TRIPLETS = Asset(name="megapairs_triplets", uri="file://" + SETTINGS.output_root.rstrip("/") + "/")

PARAMS = {
    "corpus": Param(
        SETTINGS.default_corpus,
        type="string",
        minLength=1,
        title="Corpus",
        description="Image folder with sidecar captions, a manifest (Parquet/JSONL/CSV) or WebDataset tar(s).",
    ),
    "config": Param(
        SETTINGS.default_config,
        type="string",
        minLength=1,
        pattern=r"\.ya?ml$",
        title="Pipeline config",
        description="YAML profile: configs/demo.yaml (CPU, no downloads) or configs/megapairs.yaml (paper).",
    ),
    "output_root": Param(
        SETTINGS.output_root,
        type="string",
        minLength=1,
        title="Output root",
        description="Runs write into OUTPUT_ROOT/<logical date> (scheduled, backfill) or OUTPUT_ROOT/<run id>.",
    ),
    "run_name": Param(
        "",
        type="string",
        pattern=r"^[A-Za-z0-9._-]*$",
        title="Run name",
        description="Optional partition name overriding the logical date / run id (letters, digits, . _ -).",
    ),
}
BATCH_LABEL = (
    "{% set b = task.op_kwargs['batch'] %}{{ b[0]['id'] }}{% if b | length > 1 %}..{{ b[-1]['id'] }}{% endif %}"
)


@contextmanager
def _permanent_errors_fail_at_once():
    """A permanent error (megapairs_ops.errors: config, corpus, gate, credentials, resource
    limits) fails the task without retries: running it again gives the same answer. Transient
    ones (an endpoint that stays down) and anything unexpected are retried as usual."""
    from airflow.sdk.exceptions import AirflowFailException

    from megapairs_ops.errors import PermanentError

    try:
        yield
    except PermanentError as exc:
        raise AirflowFailException(str(exc)) from exc


def _ctx():
    """The pipeline's run context, rebuilt from the DAG run inside each task."""
    from megapairs_ops.pipeline import context_from_params

    context = get_current_context()
    params, dag_run = context["params"], context["dag_run"]
    part = partition_name(
        dag_run.run_id, dag_run.run_type, getattr(dag_run, "logical_date", None), params.get("run_name", "")
    )
    out = f"{params['output_root'].rstrip('/')}/{part}"
    return context_from_params(params["config"], params["corpus"], out, run_id=dag_run.run_id)


@task
def check_config() -> list[str]:
    """Validate the config, the environment variables and the model endpoints it names before any
    work starts, and list the encoders that per-encoder stages fan out over. Files a stage needs
    on its worker (model folders) are checked by that stage's items, where they run."""
    from megapairs_ops.pipeline import check_before_run

    with _permanent_errors_fail_at_once():
        ctx = _ctx()
        check_before_run(ctx, local_files=False)
        return [e.name for e in ctx.cfg.encoders]


@task
def plan(stage: str, device: str, upstream: object = None) -> list[list[dict]]:
    """The stage's work items for this device, in task batches (none when it is finished: the
    mapped task is then skipped). `upstream`: the previous stage's finalize results."""
    from megapairs_ops.pipeline import plan_stage, task_batches

    with _permanent_errors_fail_at_once():
        ctx = _ctx()
        return task_batches(ctx, stage, plan_stage(ctx, stage, device))


@task
def items(stage: str, batch: list[dict]) -> list[str]:
    """Run one batch of work items; each is committed as it finishes, so a retry resumes at the
    first unfinished one. Returns the items' ids (their stats stay in the run directory)."""
    from megapairs_ops.pipeline import check_before_run, run_batch

    with _permanent_errors_fail_at_once():
        ctx = _ctx()
        # What this stage needs on this worker (a model folder of a GPU worker need not exist
        # where ingest runs).
        check_before_run(ctx, stages=[stage], probe_endpoints=False)
        run_batch(ctx, stage, batch)
    return [item["id"] for item in batch]


# none_failed: a device without work items is skipped, which must not skip its stage; a failed
# item still stops it (upstream_failed).
@task(trigger_rule="none_failed")
def finalize(stage: str, encoder: str | None = None, done: object = None) -> dict:
    """Merge the stage's committed items, gate the result, record the stage. `done`: the ids of
    the items its mapped tasks ran."""
    from megapairs_ops.pipeline import finalize_stage

    with _permanent_errors_fail_at_once():
        ctx = _ctx()
        record = finalize_stage(ctx, stage, encoder)
    if stage == "publish":
        get_current_context()["outlet_events"][TRIPLETS].extra = {
            "run_dir": str(ctx.layout.root), "triplets": record.get("rows_out"), "run_id": ctx.run_id,
        }
    # Only small summaries go to XCom; artifacts stay in the run directory.
    return {k: record.get(k) for k in ("stage", "rows_in", "rows_out", "seconds", "skipped")}


# A teardown (made so below): it runs when everything before it is done, however that went, and
# does not count for the run's state. As a plain all_done leaf it would be the only task that
# does, and a run whose ingest or gate failed would end "success".
@task
def report() -> str | None:
    """The curator report, also for a run whose gate stopped publishing: it says why."""
    from megapairs_ops.pipeline import build_run_report

    built = build_run_report(_ctx())
    return built and built.get("report")


def stage_group(stage, encoders, upstream):
    """The one task-group shape of every stage; returns its finalize (what the next stage plans
    from)."""
    with TaskGroup(stage.name):
        ran = []
        for device in stage.devices:
            routed = stage.task_resources(device)
            batches = plan.override(task_id=f"plan_{device}")(stage.name, device, upstream)
            ran.append(
                items.override(
                    task_id=f"items_{device}",
                    queue=routed.queue_name(SETTINGS.gpu_queue) or "default",
                    pool=routed.pool_name(SETTINGS.gpu_pool, SETTINGS.llm_pool) or "default_pool",
                    map_index_template=BATCH_LABEL,
                ).partial(stage=stage.name).expand(batch=batches)
            )
        done = ran[0] if len(ran) == 1 else ran
        outlets = [TRIPLETS] if stage.name == "publish" else []
        if stage.per_encoder:
            finished = finalize.override(
                task_id="finalize", outlets=outlets, map_index_template="{{ task.op_kwargs['encoder'] }}",
            ).partial(stage=stage.name, done=done).expand(encoder=encoders)
        else:
            finished = finalize.override(task_id="finalize", outlets=outlets)(stage.name, done=done)
    return finished


@dag(
    dag_id="megapairs_synthesis",
    description="Synthesise MegaPairs-style (query image, instruction, target image) triplets",
    schedule=SETTINGS.schedule,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=SETTINGS.max_active_runs,
    params=PARAMS,
    default_args={
        "retries": SETTINGS.retries,
        "retry_delay": timedelta(seconds=SETTINGS.retry_delay_s),
        "retry_exponential_backoff": True,
    },
    tags=["megapairs"],
    doc_md=__doc__,
)
def megapairs_synthesis():
    encoders = check_config()
    upstream = encoders
    for stage in all_stages():
        upstream = stage_group(stage, encoders, upstream)
    upstream >> report().as_teardown()


megapairs_synthesis()
