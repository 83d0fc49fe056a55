"""MegaPairs synthesis DAG: wiring only. Every task calls a function of megapairs_ops: a stage
through megapairs_ops.pipeline.run_stage, the same call the `megapairs run` CLI makes, or the
planning and work-item functions of the stages whose work is mapped over tasks (embed, mine,
annotate), after which run_stage finds the items done and finalizes. Parsing this file imports the
Airflow SDK and reads the deployment settings (environment + the default profile's `resources`);
stage code and its heavy libraries load inside the tasks.

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
    from megapairs_ops.stages.annotate.backends import BackendError
    from megapairs_ops.config import ConfigError
    from megapairs_ops.stages.ingest.core import IngestError
    from megapairs_ops.quality.gates import ValidationFailed

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


def _plan(stage: str, device: str | None = None) -> list[dict]:
    """A stage's work items for mapped tasks: small JSON-able dicts; none when the stage is
    finished (an empty expansion is skipped)."""
    from megapairs_ops import pipeline

    with _fail_without_retry_on_bad_input():
        ctx = _ctx()
        if stage == "embed":
            return pipeline.plan_embed_stage(ctx, device)
        return pipeline.plan_annotate_stage(ctx)


def _embed_shards(item: dict) -> dict:
    from megapairs_ops.stages.embed.work import run_embed_work

    with _fail_without_retry_on_bad_input():
        ctx = _ctx()
        # Shards are committed one by one; a retry skips the finished ones.
        return run_embed_work(ctx.cfg, ctx.layout, item)


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
        """Validate the config, the environment variables and the model endpoints it names before
        any work starts, and list the encoders to fan out over."""
        from megapairs_ops.pipeline import check_before_run

        with _fail_without_retry_on_bad_input():
            ctx = _ctx()
            check_before_run(ctx)
            return [e.name for e in ctx.cfg.encoders]

    @task
    def ingest() -> dict:
        return _run("ingest")

    # Expanding over a key of a multiple_outputs planner would map over the number of keys, not
    # over the list under the key (Airflow records one map length per task): one planner per device.
    @task
    def plan_embed_gpu() -> list[dict]:
        """Embedding work items (encoder group x range of shards) of the GPU encoders."""
        return _plan("embed", "gpu")

    @task
    def plan_embed_cpu() -> list[dict]:
        """Embedding work items of the CPU encoders: they never hold the GPU queue or pool."""
        return _plan("embed", "cpu")

    shard_label = "{{ task.op_kwargs['item']['encoders'] | join('+') }}@{{ task.op_kwargs['item']['shards'] | join('-') }}"

    @task(queue=SETTINGS.gpu_queue, pool=SETTINGS.gpu_pool, map_index_template=shard_label)
    def embed_gpu_shards(item: dict) -> dict:
        return _embed_shards(item)

    @task(map_index_template=shard_label)
    def embed_cpu_shards(item: dict) -> dict:
        return _embed_shards(item)

    # none_failed: a device without work items is skipped, which must not skip the embedding; a
    # failed shard task still stops it (upstream_failed).
    @task(trigger_rule="none_failed", map_index_template="{{ task.op_kwargs['encoder'] }}")
    def embed(encoder: str) -> str:
        """Merge the encoder's shards into its vectors (the stage re-plans, finds every shard
        done, finalizes without loading a model)."""
        _run("embed", encoder)
        return encoder

    @task
    def plan_mining(embedded: list[str]) -> list[dict]:
        """Query shards of every encoder; the index is chosen here (and an approximate one trained
        once), so the mapped shards only search."""
        from megapairs_ops.pipeline import plan_mine_stage

        with _fail_without_retry_on_bad_input():
            return plan_mine_stage(_ctx(), embedded)

    @task(map_index_template="{{ task.op_kwargs['item']['encoder'] }}@{{ task.op_kwargs['item']['query_start'] }}")
    def mine_shard(item: dict) -> None:
        from megapairs_ops.stages.mine.work import run_mining_work

        ctx = _ctx()
        run_mining_work(ctx.cfg, ctx.layout, item)  # atomic per shard; a retry skips finished ones

    # none_failed: finished encoders plan no query shards (mine_shard skipped) yet still pass.
    @task(trigger_rule="none_failed", map_index_template="{{ task.op_kwargs['encoder'] }}")
    def mine(encoder: str) -> str:
        """Merge the encoder's shards into its candidates (the stage re-plans, finds every shard
        done, merges) and run the mining gate."""
        _run("mine", encoder)
        return encoder

    @task
    def pairs(mined: list[str]) -> dict:
        return _run("pairs")

    @task
    def plan_annotate() -> list[dict]:
        """Pairs the catalogue already published with the same models and prompt version are
        reused, not planned; the rest is cut into pair-id ranges."""
        return _plan("annotate")

    @task(pool=SETTINGS.llm_pool, map_index_template="{{ task.op_kwargs['item']['first'] }}-{{ task.op_kwargs['item']['last'] }}")
    def annotate_pairs(item: dict) -> dict:
        from megapairs_ops.stages.publish.catalogue import run_annotate_item

        with _fail_without_retry_on_bad_input():
            ctx = _ctx()
            # Every outcome is checkpointed as it arrives: a retry asks only what is missing.
            stats = run_annotate_item(ctx.cfg, ctx.layout, item, ctx.run_id)
        return {k: stats.get(k) for k in ("item", "pairs", "pairs_requested", "accepted", "failed")}

    @task(trigger_rule="none_failed")
    def annotate() -> dict:
        """Merge the work items' outputs with the reused annotations (the stage finds every item
        done and asks no model) and record the stage."""
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

    # A teardown (made so below): it runs when everything before it is done, however that went,
    # and does not count for the run's state. As a plain all_done leaf it would be the only
    # task that does, and a run whose ingest or gate failed would end "success".
    @task
    def report() -> str | None:
        """The curator report, also for a run whose gate stopped publishing: it says why."""
        from megapairs_ops.pipeline import build_run_report

        built = build_run_report(_ctx())
        return built and built.get("report")

    encoders = plan_encoders()
    ingested = ingest()
    gpu_items, cpu_items = plan_embed_gpu(), plan_embed_cpu()
    encoders >> ingested >> [gpu_items, cpu_items]
    embedded = embed.expand(encoder=encoders)
    [embed_gpu_shards.expand(item=gpu_items), embed_cpu_shards.expand(item=cpu_items)] >> embedded
    shards = mine_shard.expand(item=plan_mining(embedded))
    mined = mine.expand(encoder=encoders)
    shards >> mined
    annotate_items = plan_annotate()
    pairs(mined) >> annotate_items
    annotate_pairs.expand(item=annotate_items) >> annotate() >> publish() >> report().as_teardown()


megapairs_synthesis()
