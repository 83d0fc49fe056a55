"""DuckDB, the one way: named SQL files from `sql/` (shipped as package data) and sessions opened
with the config's `duckdb` section. Python passes parameters; it never builds SQL."""

from __future__ import annotations

import os
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megapairs_ops.config import PipelineConfig, parse_bytes

if TYPE_CHECKING:
    import duckdb

    from megapairs_ops.layout import RunLayout

# A source checkout reads the repository's sql/ folder; an installed wheel carries the same files
# as the package megapairs_ops.sql (pyproject.toml maps it). MEGAPAIRS_SQL_DIR overrides both.
_REPO_SQL = Path(__file__).resolve().parent.parent / "sql"


def _sql_dir() -> Traversable:
    if os.environ.get("MEGAPAIRS_SQL_DIR"):
        return Path(os.environ["MEGAPAIRS_SQL_DIR"])
    if _REPO_SQL.is_dir() and (_REPO_SQL.parent / "pyproject.toml").is_file():
        return _REPO_SQL
    return resources.files("megapairs_ops.sql")


@cache
def sql(name: str) -> str:
    source = _sql_dir().joinpath(f"{name}.sql")
    if not source.is_file():
        raise FileNotFoundError(f"SQL file {source} not found; set MEGAPAIRS_SQL_DIR to the repo's sql/ folder")
    return source.read_text()


def session_settings(cfg: PipelineConfig, layout: RunLayout | None, stage: str, **extra: Any) -> dict[str, Any]:
    """The settings every DuckDB session of `stage` opens with: duckdb.memory_limit and threads,
    and a spill folder (duckdb.temp_directory, else the stage's own, which the stage empties
    when it starts)."""
    dcfg = cfg.duckdb
    settings: dict[str, Any] = {"memory_limit": f"{parse_bytes(dcfg.memory_limit)}B"}
    if dcfg.threads:
        settings["threads"] = dcfg.threads
    spill: Path | None = None
    if dcfg.temp_directory:
        spill = Path(dcfg.temp_directory).expanduser()
        if not spill.is_absolute() and layout is not None:
            spill = layout.root / spill
    elif layout is not None:
        spill = layout.spill_dir(stage)
    if spill is not None:
        spill.mkdir(parents=True, exist_ok=True)
        settings["temp_directory"] = str(spill)
    settings.update(extra)
    return settings


def connect(
    cfg: PipelineConfig, layout: RunLayout | None, stage: str, database: str | Path = ":memory:", **extra: Any
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with `session_settings`; `extra` adds settings of this caller."""
    return open_session(session_settings(cfg, layout, stage, **extra), database)


def open_session(settings: dict[str, Any] | None, database: str | Path = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with settings made by `session_settings` (code that gets them passed
    down, e.g. in a worker process, instead of the config). The one place that connects."""
    import duckdb

    con = duckdb.connect(str(database), config=dict(settings or {}))
    con.execute("SET enable_progress_bar = false")
    return con
