"""Where an OpenAI-compatible step sends its requests: base URL and API key from the step's
config, an Airflow connection (`connection_id`) or an environment variable (`api_key_env`), each
problem an EndpointConfigError naming the config key."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from megapairs_ops.config import StepConfig
from megapairs_ops.stages.annotate.backends import BackendError


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    key_source: str = "none"  # "connection:<id>", "env:<NAME>" or "none": safe to log

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


class EndpointConfigError(BackendError):
    """The endpoint or its key cannot be resolved from the step's config; `field` names the
    StepConfig key to fix (connection_id, api_key_env or base_url)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.field, str(self))


def _airflow_connection(conn_id: str) -> Any:
    try:
        from airflow.sdk import Connection
    except ImportError as exc:
        raise EndpointConfigError("connection_id", f"connection_id '{conn_id}' needs Airflow installed ({exc})") from None
    try:
        return Connection.get(conn_id)
    except Exception as exc:  # AirflowNotFoundException and secrets-backend errors
        raise EndpointConfigError(
            "connection_id", f"Airflow connection '{conn_id}' could not be read: {type(exc).__name__}"
        ) from None


def _connection_base_url(conn: Any) -> str | None:
    extra = conn.extra_dejson if conn.extra else {}
    if extra.get("base_url"):
        return str(extra["base_url"])
    host = (conn.host or "").strip()
    if not host:
        return None
    if "://" in host:
        return host
    scheme = "https" if conn.conn_type in ("https",) else "http"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}/{(conn.schema or 'v1').strip('/')}"


def resolve_endpoint(step: StepConfig) -> Endpoint:
    """base_url from the config, else from the Airflow connection; the key from the connection's
    password (or its extra `api_key`), else from the environment variable `api_key_env`."""
    base_url, key, source = step.base_url, None, "none"
    if step.connection_id:
        conn = _airflow_connection(step.connection_id)
        base_url = base_url or _connection_base_url(conn)
        key = conn.password or (conn.extra_dejson.get("api_key") if conn.extra else None)
        if key:
            source = f"connection:{step.connection_id}"
    if not key and step.api_key_env:
        key = os.environ.get(step.api_key_env)
        if not key:
            raise EndpointConfigError(
                "api_key_env",
                f"annotate backend 'openai': environment variable {step.api_key_env} "
                "(named by api_key_env) is not set or empty",
            )
        source = f"env:{step.api_key_env}"
        # Inside an Airflow worker, have the task log redact it too (never import Airflow for this).
        if "airflow.sdk" in sys.modules:
            try:
                from airflow.sdk.log import mask_secret

                mask_secret(key)
            except Exception:
                pass
    if not base_url:
        raise EndpointConfigError(
            "base_url",
            f"annotate backend 'openai': no endpoint; set base_url or give connection '{step.connection_id}' a host",
        )
    return Endpoint(base_url, key or None, source)
