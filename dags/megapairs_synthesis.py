"""MegaPairs synthesis DAG: wiring only. Every task calls a stage function of megapairs_ops.pipeline,
the same functions the `megapairs run` CLI calls. Parsing this file imports the Airflow SDK and
reads the deployment settings (environment + the default profile's `resources`); stage code and
its heavy libraries load inside the tasks.

Scheduled and backfill runs write to OUTPUT_ROOT/<logical date>, manual runs to
OUTPUT_ROOT/<run id> (or OUTPUT_ROOT/<run_name> when given), so runs never collide and re-running a
date redoes only what changed in its own partition. Publishing updates the `megapairs_triplets`
asset, so a training DAG can be scheduled on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

from megapairs_ops.deployment import deployment_settings, partition_name

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


@contextmanager
def _fail_without_retry_on_bad_input():
    """Retrying cannot fix a bad config, an unusable corpus, rejected credentials or data that
    fails its gate."""
    from airflow.sdk.exceptions import AirflowFailException
    from megapairs_ops.annotation.backends import BackendError
    from megapairs_ops.config import ConfigError
    from megapairs_ops.ingest import IngestError
    from megapairs_ops.validate import ValidationFailed

    try:
        yield
    # BackendError: a bad endpoint config or rejected credentials. An endpoint that is merely
    # down raises EndpointUnavailable instead, which Airflow retries; committed records are kept.
    except (BackendError, ConfigError, IngestError, ValidationFailed) as exc:
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


def _run(stage: str, encoder: str | None = None) -> dict:
    from megapairs_ops.pipeline import run_stage

    with _fail_without_retry_on_bad_input():
        record = run_stage(_ctx(), stage, encoder)
    # Only small summaries go to XCom; artifacts stay in the run directory.
    return {k: record.get(k) for k in ("stage", "rows_in", "rows_out", "seconds", "skipped")}


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
    @task
    def plan_encoders() -> list[str]:
        """Validate the config before any work starts and list the encoders to fan out over."""
        with _fail_without_retry_on_bad_input():
            return [e.name for e in _ctx().cfg.encoders]

    @task
    def ingest() -> dict:
        return _run("ingest")

    @task(queue=SETTINGS.gpu_queue, pool=SETTINGS.gpu_pool, map_index_template="{{ task.op_kwargs['encoder'] }}")
    def embed(encoder: str) -> str:
        _run("embed", encoder)
        return encoder

    @task
    def plan_mining(embedded: list[str]) -> list[dict]:
        """Query shards of every encoder; the index is chosen here (and an approximate one trained
        once), so the mapped shards only search."""
        from megapairs_ops.mine import plan_mining_work

        ctx = _ctx()
        return [item for enc in embedded for item in plan_mining_work(ctx.cfg, ctx.layout, enc)]

    @task(map_index_template="{{ task.op_kwargs['item']['encoder'] }}@{{ task.op_kwargs['item']['query_start'] }}")
    def mine_shard(item: dict) -> None:
        from megapairs_ops.mine import run_mining_work

        ctx = _ctx()
        run_mining_work(ctx.cfg, ctx.layout, item)  # atomic per shard; a retry skips finished ones

    @task(map_index_template="{{ task.op_kwargs['encoder'] }}")
    def mine(encoder: str) -> str:
        """Merge the encoder's shards into its candidates (the stage re-plans, finds every shard
        done, merges) and run the mining gate."""
        _run("mine", encoder)
        return encoder

    @task
    def pairs(mined: list[str]) -> dict:
        return _run("pairs")

    @task(pool=SETTINGS.llm_pool)
    def annotate() -> dict:
        return _run("annotate")

    @task(outlets=[TRIPLETS])
    def publish() -> dict:
        summary = _run("publish")
        ctx = _ctx()
        get_current_context()["outlet_events"][TRIPLETS].extra = {
            "run_dir": str(ctx.layout.root),
            "triplets": summary.get("rows_out"),
            "run_id": ctx.run_id,
        }
        return summary

    @task(trigger_rule="all_done")
    def report() -> str | None:
        """The curator report, also for a run whose gate stopped publishing: it says why."""
        from megapairs_ops.pipeline import build_run_report

        built = build_run_report(_ctx())
        return built and built.get("report")

    encoders = plan_encoders()
    ingested = ingest()
    embedded = embed.expand(encoder=encoders)
    encoders >> ingested >> embedded
    shards = mine_shard.expand(item=plan_mining(embedded))
    mined = mine.expand(encoder=encoders)
    shards >> mined
    pairs(mined) >> annotate() >> publish() >> report()


megapairs_synthesis()
