"""What a stage is: one declared object, in the spirit of NeMo Curator's ProcessingStage and
datatrove's PipelineStep.

A stage declares its name, whether it runs per encoder, its upstream stages, the config that
defines its result (runtime knobs are left out by the config's RUNTIME marker), its gate, the
stats keys of its rows in and out, and the resources its work items need. Its work goes
plan -> work items -> finalize:

- `plan(ctx, encoders)` lists JSON-able work items (each with a stable "id") and records them
  in the stage's work dir (storage.WorkDir); it is cheap to call again and returns the same
  items while the execution is under way;
- `run_items(ctx, items, commit)` does the items, calling `commit(item, stats)` as each one is
  done (after its outputs are in place); an item already committed is never run again;
- `finalize(ctx, encoder)` requires every item, merges their outputs into the stage's artifacts
  and returns the stage's stats.

The runner (runner.py) adds what every stage shares: fingerprints, status records, temp sweeps,
gates, the run's stats. The CLI runs the items in a process pool (executor.py); the DAG maps
Airflow tasks over them. Adding a stage means one module that subclasses Stage and one line in
registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from megapairs_ops.layout import RunLayout

if TYPE_CHECKING:  # the DAG reads declarations while it is parsed: nothing heavy at import
    from megapairs_ops.config import PipelineConfig
    from megapairs_ops.storage import WorkDir

    from .context import RunContext

Device = Literal["cpu", "gpu"]
Commit = Callable[[dict[str, Any], dict[str, Any]], None]
# What storage and the runner add to every committed item's stats: bookkeeping, not results.
ITEM_BOOKKEEPING = ("item", "item_seconds", "worker_pid")


def item_result(stats: dict[str, Any]) -> dict[str, Any]:
    """A committed item's stats without the bookkeeping: what the item itself reported."""
    return {k: v for k, v in stats.items() if k not in ITEM_BOOKKEEPING}


def stage_key(stage: str, encoder: str | None = None) -> str:
    return f"{stage}-{encoder}" if encoder else stage


@dataclass(frozen=True)
class Resources:
    """What a work item needs where it runs: Airflow routes it to a queue and pool; the CLI
    decides whether items may run side by side in worker processes."""

    device: Device = "cpu"
    # Which configured pool caps it: "gpu" (accelerator work), "llm" (model endpoints) or
    # Airflow's default pool.
    pool: Literal["default", "gpu", "llm"] = "default"
    # CPU-bound items run in parallel processes under the CLI; items that already keep the
    # machine busy on their own (a GPU, an HTTP client with its own concurrency, FAISS or DuckDB
    # threads) run one at a time.
    processes: bool = False

    def queue_name(self, gpu_queue: str) -> str | None:
        """The Airflow queue (None: the default one), given the deployment's GPU queue."""
        return gpu_queue if self.device == "gpu" else None

    def pool_name(self, gpu_pool: str, llm_pool: str) -> str | None:
        """The Airflow pool (None: default_pool), given the deployment's pools."""
        return {"gpu": gpu_pool, "llm": llm_pool}.get(self.pool)


class Stage:
    name: ClassVar[str]
    per_encoder: ClassVar[bool] = False
    # Upstream stage names. A per-encoder stage after a per-encoder stage waits for the same
    # encoder; a stage after a per-encoder stage waits for every encoder.
    upstream: ClassVar[tuple[str, ...]] = ()
    # The quality gate (quality/suites.py) its output must pass before it counts as finished.
    gate: ClassVar[str | None] = None
    # Keys of its stats that count rows in and out (the funnel in stats.json).
    rows: ClassVar[tuple[str, str]] = ("rows_in", "rows_out")
    # The devices its items may need; the DAG maps one task per device.
    devices: ClassVar[tuple[Device, ...]] = ("cpu",)

    # -- what defines the result -------------------------------------------------------------
    def result_config(self, ctx: RunContext, encoder: str | None) -> list[Any]:
        """Config values (models, sections) and inputs that define this stage's result. The
        runner strips runtime knobs and adds the upstream stages' results."""
        raise NotImplementedError

    # -- work ----------------------------------------------------------------------------------
    def work(self, layout: RunLayout, encoder: str | None) -> WorkDir:
        from megapairs_ops.storage import WorkDir

        return WorkDir(layout.work_dir(stage_key(self.name, encoder)))

    def plan(self, ctx: RunContext, encoders: list[str | None], device: Device | None = None) -> list[dict[str, Any]]:
        """The work items of the given (unfinished) encoders, [None] for a plain stage; with a
        device, only those items (a planner per device in Airflow)."""
        raise NotImplementedError

    def device(self, cfg: PipelineConfig, encoder: str | None) -> Device:
        """The device every work item of this key needs (one per key, so the planner of each
        device owns its keys' work dirs alone)."""
        return "cpu"

    @classmethod
    def task_resources(cls, device: Device) -> Resources:
        """What the items of a device need: the same for every item of that device, so the DAG
        routes each device's mapped task from the declaration alone."""
        return Resources(device=device)

    def resources(self, cfg: PipelineConfig, item: dict[str, Any]) -> Resources:
        return self.task_resources(item.get("device") or self.device(cfg, item.get("encoder")))

    def per_task(self, cfg: PipelineConfig) -> int:
        """Work items per mapped Airflow task (and per process-pool submission under the CLI)."""
        return 1

    def is_done(self, ctx: RunContext, item: dict[str, Any]) -> bool:
        return self.work(ctx.layout, item.get("encoder")).is_done(item["id"])

    def committed(self, ctx: RunContext, item: dict[str, Any]) -> dict[str, Any]:
        return self.work(ctx.layout, item.get("encoder")).stats(item["id"]) or {}

    def commit(self, ctx: RunContext, item: dict[str, Any], stats: dict[str, Any]) -> None:
        self.work(ctx.layout, item.get("encoder")).commit(item["id"], stats)

    def run_items(self, ctx: RunContext, items: list[dict[str, Any]], commit: Commit) -> None:
        """Do every item (none is committed yet), calling `commit(item, stats)` after each."""
        for item in items:
            commit(item, self.run_item(ctx, item))

    def run_item(self, ctx: RunContext, item: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def finalize(self, ctx: RunContext, encoder: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def gate_failed(self, ctx: RunContext, encoder: str | None) -> None:
        """The gate rejected the output (publish moves its triplets aside)."""

    def accepted(self, ctx: RunContext, encoder: str | None, stats: dict[str, Any]) -> dict[str, Any]:
        """The gate passed; last word before the status is written (publish records the dataset
        version here, so only a publication that passed its gate becomes one)."""
        return stats

    # -- bookkeeping ---------------------------------------------------------------------------
    def outputs(self, layout: RunLayout, encoder: str | None) -> list[Path]:
        """Every file and folder only this stage writes (temp leftovers there are swept when it
        finalizes, and its work dir is removed once it finished)."""
        return []

    def work_left(self, status: dict[str, Any]) -> bool:
        """Whether a finished stage still has work a re-run would do (annotation failures under
        their retry budget)."""
        return False

    def after_finish(self, ctx: RunContext, encoder: str | None) -> None:
        """Runs once the stage's status is written: its work dir is no longer needed."""
        self.work(ctx.layout, encoder).clear()
