"""One error taxonomy: what a retry cannot fix is permanent (the DAG fails the task at once),
what it may fix is transient (Airflow retries it)."""

import textwrap

import pytest

from megapairs_ops import errors
from megapairs_ops.config import ConfigError
from megapairs_ops.quality.gates import ValidationFailed
from megapairs_ops.stages.annotate.backends.endpoint import EndpointConfigError
from megapairs_ops.stages.annotate.prompts import PromptError
from megapairs_ops.stages.annotate.types import BackendError, EndpointUnavailable
from megapairs_ops.stages.embed.encoders import EncoderLoadError
from megapairs_ops.stages.embed.encoders.precomputed import PrecomputedError
from megapairs_ops.stages.ingest.readers import IngestError
from megapairs_ops.stages.mine.index import MiningResourceError
from megapairs_ops.stages.publish.curation import CurationError
from tests.fixtures.airflow import REPO, run_airflow_python

PERMANENT = {
    ConfigError: errors.ConfigError,
    PromptError: errors.ConfigError,
    PrecomputedError: errors.ConfigError,
    CurationError: errors.ConfigError,
    IngestError: errors.CorpusError,
    ValidationFailed: errors.GateFailed,
    BackendError: errors.CredentialsError,
    EndpointConfigError: errors.CredentialsError,
    MiningResourceError: errors.ResourceLimitError,
    EncoderLoadError: errors.PermanentError,
    errors.StageNotReady: errors.PermanentError,
    errors.ItemsNotDone: errors.PermanentError,
}


@pytest.mark.parametrize("cls", list(PERMANENT), ids=lambda c: c.__name__)
def test_errors_a_retry_cannot_fix_are_permanent(cls):
    assert issubclass(cls, PERMANENT[cls]) and issubclass(cls, errors.PermanentError)
    assert not issubclass(cls, errors.TransientError)


def test_an_endpoint_that_stays_down_is_transient():
    assert issubclass(EndpointUnavailable, errors.TransientError)
    assert not issubclass(EndpointUnavailable, errors.PermanentError)


def test_the_dag_fails_permanent_errors_at_once_and_leaves_the_rest_to_retries(airflow_home):
    code = textwrap.dedent(f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("dag", {str(REPO / "dags" / "megapairs_synthesis.py")!r})
        dag = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(dag)
        from megapairs_ops.errors import ConfigError, GateFailed, ResourceLimitError
        from megapairs_ops.stages.annotate.types import EndpointUnavailable
        seen = {{}}
        for exc in (ConfigError("c.yaml: mining.k: too small"), GateFailed("pairs gate failed"),
                    ResourceLimitError("does not fit"), EndpointUnavailable("down"), OSError("disk")):
            try:
                with dag._permanent_errors_fail_at_once():
                    raise exc
            except BaseException as raised:
                seen[type(exc).__name__] = [type(raised).__name__, str(raised)]
        print(json.dumps(seen))
    """)
    proc = run_airflow_python(airflow_home, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {
        "ConfigError": ["AirflowFailException", "c.yaml: mining.k: too small"],
        "GateFailed": ["AirflowFailException", "pairs gate failed"],
        "ResourceLimitError": ["AirflowFailException", "does not fit"],
        "EndpointUnavailable": ["EndpointUnavailable", "down"],
        "OSError": ["OSError", "disk"],
    }
