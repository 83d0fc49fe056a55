"""Atomic writes, the one work-item protocol, and per-stage status records.

Every output is written to a temporary sibling and renamed into place, so a reader sees either
the previous complete file or the new complete file, never a half-written one.

Two markers say what is finished, and nothing else does:
- a work item is done when its stats file exists in the stage's work dir (`WorkDir.commit`,
  written atomically after the item's outputs), the way img2dataset's shard stats file is;
- a stage is finished when its status record exists with a matching fingerprint
  (`mark_finished`, the last thing a stage writes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .layout import RunLayout

# Bumped when a stage's semantics change, so old outputs are recomputed instead of reused.
STAGE_CODE_VERSION = "1"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    # mkstemp creates 0600 files; published artifacts get the usual umask-based mode so other
    # users (Airflow workers, curators) can read them.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory next to `final`; swap it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_temp(name: str, of: str | None = None) -> bool:
    """Whether `name` is what an interrupted atomic write leaves: a temp file or folder
    (".<final>.<random>.tmp") or the old copy of a swapped folder (".<final>.old-<pid>-<ns>")."""
    if not name.startswith("."):
        return False
    if of is not None and not name.startswith(f".{of}."):
        return False
    return name.endswith(".tmp") or ".old-" in name


def sweep_temps(path: Path, min_age_s: float = 0.0) -> int:
    """Remove what interrupted writes of `path` left behind: its temp siblings and, for a folder,
    every temp entry inside it. Call it only where no other process writes `path` (a stage's own
    outputs when it starts); for a folder other runs share, `min_age_s` spares recent entries.
    Returns how many entries were removed."""
    path = Path(path)
    found: list[Path] = []
    if path.parent.is_dir():
        found += [p for p in path.parent.iterdir() if _is_temp(p.name, of=path.name)]
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            temps = [Path(root, n) for n in dirs + files if _is_temp(n)]
            found += temps
            dirs[:] = [d for d in dirs if not _is_temp(d)]  # removed whole below
    now = time.time()
    removed = 0
    for entry in found:
        try:
            if min_age_s and now - entry.lstat().st_mtime < min_age_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def clear_dir(path: Path) -> None:
    """Empty a scratch folder (DuckDB spill files of a killed process) and recreate it."""
    shutil.rmtree(path, ignore_errors=True)
    Path(path).mkdir(parents=True, exist_ok=True)


def file_stamps(*paths: Path) -> list[list[Any]]:
    """(path, size, mtime) of each file: a cheap identity of a stage's inputs for its work
    fingerprint (a missing file stamps as absent)."""
    out: list[list[Any]] = []
    for path in paths:
        try:
            st = Path(path).stat()
            out.append([str(path), st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            out.append([str(path), None, None])
    return out


def write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj: Any, path: Path, sort_keys: bool = True) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class WorkDir:
    """A stage's work items in storage (layout.work_dir(stage key)).

    `start` writes plan.json once per execution: the fingerprint of what the items compute, an
    execution id, the item ids and whatever the planner records beside them. An item is done when
    `commit` has written its stats file, after the item's own outputs; `require_all` is what a
    stage's finalize calls before it merges anything. A plan made for other inputs is cleared
    with everything committed under it, so stale items are never mistaken for done ones."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    def plan(self) -> dict[str, Any] | None:
        try:
            return read_json(self.plan_file) if self.plan_file.is_file() else None
        except (OSError, ValueError):
            return None

    def start(
        self, fingerprint: str, items: list[str] | None = None,
        artifacts: Callable[[Path], dict[str, Any] | None] | None = None, **extra: Any,
    ) -> dict[str, Any]:
        """The plan of this execution: the existing one when it was made for the same inputs
        (and items), so a resumed execution keeps its committed items; else a new one in a fresh
        folder. `artifacts(root)` writes what the items will read (a listing, a split, an index)
        before plan.json and may return more to record in it, "items" included when they follow
        from what it wrote; a plan exists only complete."""
        plan = self.plan()
        if plan and plan.get("fingerprint") == fingerprint and (items is None or plan.get("items") == items):
            return plan
        self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        plan = {"fingerprint": fingerprint, "execution": uuid.uuid4().hex[:16], "items": items, **extra}
        if artifacts is not None:
            plan.update(artifacts(self.root) or {})
        if plan["items"] is None:
            raise ValueError(f"{self.root}: a plan needs its item ids")
        write_json(plan, self.plan_file)
        return plan

    def matches(self, fingerprint: str) -> dict[str, Any] | None:
        """The plan, when it was made for these inputs."""
        plan = self.plan()
        return plan if plan and plan.get("fingerprint") == fingerprint else None

    def item_file(self, item_id: str) -> Path:
        return self.root / "items" / f"{_safe_name(item_id)}.json"

    def part(self, item_id: str, kind: str, suffix: str = "parquet") -> Path:
        """Where an item writes one of its outputs (write it atomically, then commit the item)."""
        return self.root / "parts" / f"{_safe_name(item_id)}.{kind}.{suffix}"

    def stats(self, item_id: str) -> dict[str, Any] | None:
        path = self.item_file(item_id)
        try:
            return read_json(path) if path.is_file() else None
        except (OSError, ValueError):
            return None

    def is_done(self, item_id: str) -> bool:
        return self.item_file(item_id).is_file()

    def commit(self, item_id: str, stats: dict[str, Any]) -> None:
        """Mark an item done: call it only after every output of the item is in place."""
        write_json({"item": item_id, **stats}, self.item_file(item_id))

    def require_all(self, item_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """The committed stats of every item (of the plan, by default); ItemsNotDone otherwise."""
        from .errors import ItemsNotDone

        if item_ids is None:
            plan = self.plan()
            if plan is None:
                raise ItemsNotDone(f"{self.root}: no plan; plan the stage before finalizing it")
            item_ids = plan["items"]
        found: list[dict[str, Any]] = []
        missing: list[str] = []
        for item_id in item_ids:
            stats = self.stats(item_id)
            if stats is None:
                missing.append(item_id)
            else:
                found.append(stats)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ItemsNotDone(
                f"{self.root.name}: {len(missing)} of {len(item_ids)} work item(s) not done: "
                f"{', '.join(missing[:5])}{more}; run them before finalizing"
            )
        return found

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _safe_name(item_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.+@" else "_" for ch in item_id)


def write_problem_rows(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write quarantine or failure rows (possibly none: an empty file says 'nothing went wrong')."""
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    write_parquet(pa.table(cols, schema=schema), path)


def merge_parts(parts_dir: Path, schema: pa.Schema, out: Path) -> int:
    parts = sorted(Path(parts_dir).glob("*.parquet")) if Path(parts_dir).is_dir() else []
    tables = [pq.read_table(p, schema=schema) for p in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    write_parquet(table, out)
    return table.num_rows


def load_status(layout: RunLayout, stage_key: str) -> dict[str, Any] | None:
    path = layout.status(stage_key)
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(layout: RunLayout, stage_key: str, fingerprint: str) -> bool:
    status = load_status(layout, stage_key)
    return bool(status and status.get("fingerprint") == fingerprint and status.get("state") == "done")


def mark_finished(
    layout: RunLayout, stage_key: str, fingerprint: str, stats: dict[str, Any], seconds: float
) -> dict[str, Any]:
    record = {
        "stage": stage_key,
        "state": "done",
        "fingerprint": fingerprint,
        "code_version": STAGE_CODE_VERSION,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **stats,
    }
    write_json(record, layout.status(stage_key))
    return record


def clear_status(layout: RunLayout, stage_key: str) -> None:
    layout.status(stage_key).unlink(missing_ok=True)
