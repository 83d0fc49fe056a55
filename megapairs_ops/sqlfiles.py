"""Named SQL files from the repository's `sql/` folder. Python passes parameters; it never builds SQL."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

SQL_DIR = Path(os.environ.get("MEGAPAIRS_SQL_DIR", Path(__file__).resolve().parent.parent / "sql"))


@cache
def sql(name: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"SQL file {path} not found; set MEGAPAIRS_SQL_DIR to the repo's sql/ folder")
    return path.read_text()
