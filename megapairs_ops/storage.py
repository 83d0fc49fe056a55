"""Run-directory layout, atomic writes and per-stage status records.

Every output is written to a temporary sibling and renamed into place, so a reader sees either
the previous complete file or the new complete file, never a half-written one. A stage is
finished when its status record exists with a matching fingerprint; the status record is the
last thing a stage writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

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


def write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj: Any, path: Path, sort_keys: bool = True) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class RunLayout:
    """Where every artifact of one run lives. Paths only; creating them is the stages' job."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    # ingest
    @property
    def images(self) -> Path:
        return self.root / "ingest" / "images.parquet"

    # embeddings: vectors.npy (float32, L2-normalised, row i <-> ids.parquet row i)
    def embedding_dir(self, encoder: str) -> Path:
        return self.root / "embeddings" / encoder

    def embedding_vectors(self, encoder: str) -> Path:
        return self.embedding_dir(encoder) / "vectors.npy"

    def embedding_ids(self, encoder: str) -> Path:
        return self.embedding_dir(encoder) / "ids.parquet"

    # mining
    def candidates(self, encoder: str) -> Path:
        return self.root / "candidates" / f"{encoder}.parquet"

    def neighbours(self, encoder: str) -> Path:
        return self.root / "neighbours" / f"{encoder}.parquet"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.parquet"

    # annotation: one part per batch, so a killed task resumes at the first missing part
    def annotation_dir(self, step: str) -> Path:
        return self.root / "annotations" / step

    @property
    def annotations(self) -> Path:
        """Accepted annotations, one row per pair: the union of all finished batch parts."""
        return self.root / "annotations.parquet"

    @property
    def triplets_dir(self) -> Path:
        return self.root / "triplets"

    @property
    def triplets_jsonl(self) -> Path:
        return self.root / "triplets.jsonl"

    # problems: each stage writes its own part, published merged at the end
    def quarantine_part(self, stage: str) -> Path:
        return self.root / "quarantine" / f"{stage}.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"

    def failures_part(self, stage: str) -> Path:
        return self.root / "failures" / f"{stage}.parquet"

    @property
    def failures(self) -> Path:
        return self.root / "failures.parquet"

    # reports
    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def stats(self) -> Path:
        return self.reports_dir / "stats.json"

    @property
    def data_docs_dir(self) -> Path:
        return self.reports_dir / "data_docs"

    @property
    def gx_dir(self) -> Path:
        return self.root / "gx"

    def spill_dir(self, stage: str) -> Path:
        """DuckDB's spill folder of one stage; emptied when the stage starts."""
        return self.root / "tmp" / stage

    def status(self, stage_key: str) -> Path:
        return self.root / "_status" / f"{stage_key}.json"


QUARANTINE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("stage", pa.string()),
    ]
)

FAILURE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("q_id", pa.string()),
        ("t_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("attempts", pa.int32()),
    ]
)


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
