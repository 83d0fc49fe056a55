"""The stage protocol and its two executors.

- stage.py: what a stage declares (name, upstream, result config, plan -> items -> finalize,
  gate, resources);
- registry.py: the stages in run order;
- runner.py: fingerprints, status records, temp sweeps, gates, the run's stats, and
  `run_stage` / `run_pipeline` for the CLI;
- executor.py: the CLI's process pool for CPU-bound work items;
- context.py: RunContext, what every stage of a run is given.

The Airflow DAG (dags/megapairs_synthesis.py) is the other executor: it is generated from the
same declarations and calls plan_stage, run_batch and finalize_stage. Importing this package is
light (the DAG parses with it); each name loads its module when first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "RunContext": "context", "context_from_params": "context", "corpus_signature": "context",
    "all_stages": "registry", "get_stage": "registry", "stage_names": "registry",
    "Resources": "stage", "Stage": "stage", "stage_key": "stage",
    **{name: "runner" for name in (
        "build_run_report", "check_before_run", "finalize_stage", "fingerprint", "output_locations", "plan_stage",
        "planned_stages", "run_batch", "run_pipeline", "run_stage", "run_work_inline",
        "task_batches", "write_run_stats",
    )},
}
__all__ = sorted([*_WHERE, "StageNotReady"])


def __getattr__(name: str) -> Any:
    if name == "StageNotReady":
        from megapairs_ops.errors import StageNotReady

        return StageNotReady
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
