"""The error taxonomy: what a retry can fix and what it cannot.

Every error the pipeline raises on purpose is either permanent (the config, the corpus, a gate,
credentials or a resource limit: running the same task again gives the same answer, so the task
fails at once) or transient (an endpoint that is down: a later try may succeed, so Airflow
retries it). The DAG wraps every task once (`dags/megapairs_synthesis.py`) and turns a permanent
error into a failure without retries; anything unexpected is retried as usual.

The concrete classes live beside the code that raises them (ConfigError in config, IngestError in
the ingest stage, ...) and derive from one of these.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Raised on purpose by the pipeline; its message is one line meant for the user."""


class PermanentError(PipelineError):
    """Retrying cannot fix it: a bad config, an unusable corpus, a failed gate, rejected
    credentials, a resource limit the work does not fit in, an upstream stage that did not run."""


class TransientError(PipelineError):
    """A later try may succeed (an endpoint that is down for longer than the task waits)."""


class ConfigError(PermanentError, ValueError):
    """A config problem, already formatted as one line: '<file>: <key>: <problem>'."""


class CorpusError(PermanentError, ValueError):
    """The corpus cannot be used at all (nothing readable, nothing usable)."""


class GateFailed(PermanentError, RuntimeError):
    """A stage's output broke its quality gate."""


class CredentialsError(PermanentError, RuntimeError):
    """A service cannot be set up or used with the configured credentials or model."""


class ResourceLimitError(PermanentError, ValueError):
    """The work does not fit in the configured memory or devices."""


class StageNotReady(PermanentError, RuntimeError):
    """An upstream stage has not finished (or finished with other settings)."""


class ItemsNotDone(PermanentError, RuntimeError):
    """A stage was finalized before all of its work items were committed."""
