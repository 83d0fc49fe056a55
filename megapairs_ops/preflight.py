"""Checks that run before any stage starts, for what a config file cannot tell on its own: whether
the environment variables it names are set, and whether the model endpoints it points at serve
the configured models. `megapairs check-config`, `megapairs run` and the DAG's first task call
it, so a mistake stops the run in seconds instead of after hours of embedding and mining.

A finding is fatal when the run could not succeed as configured (an unset key variable, rejected
credentials, a model the endpoint does not list). An endpoint that does not answer yet is only a
warning: inference servers are often started beside the pipeline and come up later, and the
annotate stage waits for them (outage_timeout_s).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

from megapairs_ops.config import ConfigError, PipelineConfig, StepConfig, local_problems

log = logging.getLogger(__name__)

# Stages whose work needs the annotation endpoints.
_ANNOTATING = {"annotate"}
_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Finding:
    key: str  # the config key to fix, e.g. annotate.describe.api_key_env
    message: str
    fatal: bool

    def line(self, source: str) -> str:
        return f"{source}: {self.key}: {self.message}"


def preflight(cfg: PipelineConfig, stages: Iterable[str] | None = None, probe_endpoints: bool = True,
              local_files: bool = True) -> list[Finding]:
    """Findings for the stages about to run (all of them when `stages` is None): with
    `local_files`, the files they need on this machine (config/environment.py); the environment
    variables they name; with `probe_endpoints`, what the model endpoints serve. The DAG checks
    local files in each stage's own work-item tasks, on the worker that needs them."""
    wanted = set(stages) if stages is not None else None
    local = local_problems(cfg, wanted) if local_files else []
    findings = [Finding(key, problem, fatal=True) for key, problem in local]
    if wanted is None or wanted & _ANNOTATING:
        probed: dict[tuple[str, str | None], _Probe] = {}
        for name in ("describe", "instruct"):
            step = getattr(cfg.annotate, name)
            if step.backend == "openai":
                findings += _openai_step(f"annotate.{name}", step, probed if probe_endpoints else None)
    return findings


def raise_on_fatal(findings: list[Finding], source: str) -> None:
    """Log the warnings; raise the first fatal finding as a one-line ConfigError."""
    fatal = [f for f in findings if f.fatal]
    for finding in findings:
        if not finding.fatal:
            log.warning("%s", finding.line(source))
    if fatal:
        more = f" (+{len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise ConfigError(fatal[0].line(source) + more)


@dataclass(frozen=True)
class _Probe:
    """What GET /models told about an endpoint: the model ids it lists (None when it lists none
    we can read), or a problem with it."""

    ids: list[str] | None = None
    problem: str = ""
    credentials_rejected: bool = False


def _openai_step(key: str, step: StepConfig, probed: dict[tuple[str, str | None], _Probe] | None) -> list[Finding]:
    """The step's endpoint and key resolve; with `probed` (a cache per endpoint), the endpoint
    lists the configured model."""
    from megapairs_ops.stages.annotate.backends.endpoint import EndpointConfigError, resolve_endpoint

    try:
        endpoint = resolve_endpoint(step)
    except EndpointConfigError as exc:
        return [Finding(f"{key}.{exc.field}", str(exc), fatal=True)]
    if probed is None:
        return []
    where = (endpoint.base_url, endpoint.api_key)
    if where not in probed:  # both steps often share one endpoint: ask it once
        probed[where] = _list_models(endpoint.base_url, endpoint.api_key, min(step.timeout_s, _PROBE_TIMEOUT_S))
    probe = probed[where]
    if probe.credentials_rejected:
        field = "connection_id" if endpoint.key_source.startswith("connection:") else "api_key_env"
        return [Finding(f"{key}.{field}", probe.problem, fatal=True)]
    if probe.problem:
        return [Finding(f"{key}.base_url", probe.problem, fatal=False)]
    if probe.ids is None or step.model in probe.ids:
        return []
    listed = (", ".join(probe.ids[:8]) + (" ..." if len(probe.ids) > 8 else "")) or "nothing"
    return [Finding(
        f"{key}.model",
        f"{endpoint.base_url} does not serve '{step.model}' (GET /models lists: {listed}); "
        "fix the model name or base_url",
        fatal=True,
    )]


def _list_models(base_url: str, api_key: str | None, timeout_s: float) -> _Probe:
    import httpx

    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return _Probe(problem=f"{url} did not answer ({type(exc).__name__}); models are not checked now, "
                      "and annotate waits for the endpoint when it starts")
    if resp.status_code in (401, 403):
        return _Probe(problem=f"{url} rejected the credentials (HTTP {resp.status_code})", credentials_rejected=True)
    if resp.status_code != 200:
        return _Probe(problem=f"{url} answered HTTP {resp.status_code}; models are not checked")
    try:
        return _Probe(ids=[str(m["id"]) for m in resp.json()["data"]])
    except (ValueError, KeyError, TypeError):
        return _Probe(problem=f"{url} did not return a model list; models are not checked")
