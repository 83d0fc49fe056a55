"""MegaPairs synthesis DAG: wiring only. Every task calls a stage function of megapairs_ops.pipeline,
the same functions the `megapairs run` CLI calls. Heavy imports happen inside the tasks, so parsing
this file costs only the Airflow SDK import."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

DEFAULT_PARAMS = {
    "corpus": Param(
        "data/sample_corpus",
        type="string",
        minLength=1,
        title="Corpus",
        description="Image folder with sidecar captions, a manifest (Parquet/JSONL/CSV) or WebDataset tar(s).",
    ),
    "config": Param(
        "configs/demo.yaml",
        type="string",
        minLength=1,
        title="Pipeline config",
        description="YAML profile: configs/demo.yaml (CPU, no downloads) or configs/megapairs.yaml (paper).",
    ),
    "output_root": Param(
        "runs",
        type="string",
        minLength=1,
        title="Output root",
        description="Each run writes into OUTPUT_ROOT/RUN_NAME.",
    ),
    "run_name": Param(
        "",
        type="string",
        pattern=r"^[A-Za-z0-9._-]*$",
        title="Run name",
        description="Folder name of this run's outputs; empty means the Airflow run id.",
    ),
}


def _ctx():
    """The pipeline's run context, rebuilt from the DAG run's params inside each task."""
    from megapairs_ops.pipeline import context_from_params

    context = get_current_context()
    params = context["params"]
    run_id = context["run_id"]
    run_name = params.get("run_name") or re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)
    out = f"{params['output_root'].rstrip('/')}/{run_name}"
    return context_from_params(params["config"], params["corpus"], out, run_id=run_id)


@contextmanager
def _fail_without_retry_on_bad_input():
    """Retrying cannot fix a bad config, an unusable corpus or data that fails its gate."""
    from airflow.sdk.exceptions import AirflowFailException
    from megapairs_ops.config import ConfigError
    from megapairs_ops.ingest import IngestError
    from megapairs_ops.validate import ValidationFailed

    try:
        yield
    except (ConfigError, IngestError, ValidationFailed) as exc:
        raise AirflowFailException(str(exc)) from exc


def _run(stage: str, encoder: str | None = None) -> dict:
    from megapairs_ops.pipeline import run_stage

    with _fail_without_retry_on_bad_input():
        record = run_stage(_ctx(), stage, encoder)
    # Only small summaries go to XCom; artifacts stay in the run directory.
    return {k: record.get(k) for k in ("stage", "rows_in", "rows_out", "seconds", "skipped")}


@dag(
    dag_id="megapairs_synthesis",
    description="Synthesise MegaPairs-style (query image, instruction, target image) triplets",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=DEFAULT_PARAMS,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
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

    @task(map_index_template="{{ task.op_kwargs['encoder'] }}")
    def embed(encoder: str) -> str:
        _run("embed", encoder)
        return encoder

    @task(map_index_template="{{ task.op_kwargs['encoder'] }}")
    def mine(encoder: str) -> str:
        _run("mine", encoder)
        return encoder

    @task
    def pairs(mined: list[str]) -> dict:
        return _run("pairs")

    @task
    def annotate() -> dict:
        return _run("annotate")

    @task
    def publish() -> dict:
        return _run("publish")

    encoders = plan_encoders()
    ingested = ingest()
    embedded = embed.expand(encoder=encoders)
    encoders >> ingested >> embedded
    mined = mine.expand(encoder=embedded)
    pairs(mined) >> annotate() >> publish()


megapairs_synthesis()
