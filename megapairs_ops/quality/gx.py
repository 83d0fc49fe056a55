"""Great Expectations plumbing: one file-backed context per GX project (the run's), cached per
process, a suite and checkpoint per validation, Data Docs refreshed by the checkpoint.

GX is imported lazily (DAG parsing must stay fast). Every GX call for a project runs under a lock
(threads and processes), because a GX project keeps datasources in one YAML file that each run
rewrites."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megapairs_ops.layout import RunLayout

from .rules import Batch, Rule

DOCS_SITE = "megapairs"
DATASOURCE = "megapairs"
BATCH_DEFINITION = "whole_dataframe"
# Enough unexpected values to recognise a problem in the error line and Data Docs, few enough
# to keep result JSON small on large tables.
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 5}

_LOCK = threading.RLock()


# gx_dir -> (context, signature of its config file when this process last wrote or read it);
# bounded, since a long-lived worker validates many runs.
_CONTEXTS: OrderedDict[Path, tuple[Any, tuple[int, int] | None]] = OrderedDict()

_MAX_CONTEXTS = 8


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # GX's own deprecation noise (e.g. importing sre_constants) says nothing about our data.
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"great_expectations(\.|$)")


@contextmanager
def _project_lock(gx_dir: Path) -> Iterator[None]:
    """Serialise GX work on one project: threads via an RLock, processes (several Airflow
    tasks of one run) via flock on a file next to the project."""
    gx_dir.mkdir(parents=True, exist_ok=True)
    with _LOCK, open(gx_dir / ".validate.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _config_signature(context: Any) -> tuple[int, int] | None:
    path = Path(context.root_directory) / "great_expectations.yml"
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _context(layout: RunLayout) -> Any:
    """The cached file context of this run's GX project, rebuilt when another process changed
    its config since this process last wrote it (else our next save would drop their edits)."""
    import great_expectations as gx
    from great_expectations.data_context.data_context.context_factory import set_context
    from great_expectations.data_context.types.base import ProgressBarsConfig

    key = Path(layout.gx_dir)
    cached = _CONTEXTS.get(key)
    if cached and _config_signature(cached[0]) == cached[1]:
        _CONTEXTS.move_to_end(key)
        set_context(cached[0])
        return cached[0]
    context = gx.get_context(mode="file", project_root_dir=str(key))
    docs_dir = Path(layout.data_docs_dir)
    # Relative to the context root, so a run directory can be moved and its docs still build.
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": os.path.relpath(docs_dir, context.root_directory) + "/",
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    variables = context.variables
    changed = False
    if variables.data_docs_sites != {DOCS_SITE: site}:
        variables.data_docs_sites = {DOCS_SITE: site}
        changed = True
    if variables.analytics_enabled is not False:
        variables.analytics_enabled = False
        changed = True
    bars = variables.progress_bars
    if not bars or bars.get("globally") is not False:
        variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        changed = True
    if changed:
        variables.save()
    # Data Docs append this id to the GX logo URL, so opening the docs would report the
    # project to GX's servers; in memory only, the id is re-derived from the stores on load.
    variables.data_context_id = None
    _CONTEXTS[key] = (context, _config_signature(context))
    _CONTEXTS.move_to_end(key)
    while len(_CONTEXTS) > _MAX_CONTEXTS:
        _CONTEXTS.popitem(last=False)
    return context


def _batch_definition(context: Any, asset_name: str) -> Any:
    try:
        source = context.data_sources.get(DATASOURCE)
    except (KeyError, ValueError, LookupError):
        source = context.data_sources.add_pandas(DATASOURCE)
    from great_expectations.exceptions import DataContextError

    try:
        asset = source.get_asset(asset_name)
    except (LookupError, DataContextError):
        asset = source.add_dataframe_asset(asset_name)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION)
    except (KeyError, LookupError, DataContextError):
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)


def _build_expectation(rule: Rule) -> Any:
    import great_expectations.expectations as gxe

    cls = getattr(gxe, rule.expectation)
    # The rule name leads the description so Data Docs and the error line use the same words.
    return cls(**rule.kwargs, meta={"rule": rule.name},
               description=f"[{rule.name}] {rule.description}",
               severity="warning" if rule.severity == "warn" else "critical")


def run_checkpoint(layout: RunLayout, suite_name: str, batch: Batch) -> tuple[Any, Path]:
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    with _project_lock(Path(layout.gx_dir)):
        context = _context(layout)
        suite = gx.ExpectationSuite(
            name=suite_name, expectations=[_build_expectation(r) for r in batch.rules]
        )
        definition = gx.ValidationDefinition(
            name=suite_name, data=_batch_definition(context, suite_name), suite=suite
        )
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=suite_name,
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[DOCS_SITE])],
                result_format=RESULT_FORMAT,
            )
        )
        run_id = RunIdentifier(run_name=layout.root.name, run_time=datetime.now(timezone.utc))
        result = checkpoint.run(batch_parameters={"dataframe": batch.df}, run_id=run_id)
        _CONTEXTS[Path(layout.gx_dir)] = (context, _config_signature(context))
    return result, Path(layout.data_docs_dir) / "index.html"
