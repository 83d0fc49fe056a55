"""Corpus readers: a folder of images with sidecar captions, a manifest (Parquet/JSONL/CSV), or
img2dataset WebDataset tars. Readers only enumerate items (a reference, a way to get the bytes, a
caption or a way to get it); reading, hashing and decoding happen in verify.py.

Each reader reads a range, so ingest's work items are ranges of the corpus: a slice of the
folder listing, a range of manifest rows, one tar shard.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow.parquet as pq

from megapairs_ops.config import IngestConfig
from megapairs_ops.errors import CorpusError
from megapairs_ops.media import ImageRejected, read_range

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
MANIFEST_EXTENSIONS = frozenset({"parquet", "jsonl", "ndjson", "csv"})
CAPTION_JSON_KEYS = ("caption", "text")


class IngestError(CorpusError):
    """The corpus as a whole cannot be ingested; the message is one line saying what to do."""


# ---------------------------------------------------------------------------------------------
# Items


class FileSource:
    def __init__(self, path: str) -> None:
        self.path = path

    def size(self) -> int:
        return os.stat(self.path).st_size

    def read(self) -> bytes:
        with open(self.path, "rb") as fh:
            return fh.read()


class TarMemberSource:
    def __init__(self, shard: str, offset: int, size: int) -> None:
        self.shard, self.offset, self._size = shard, offset, size

    def size(self) -> int:
        return self._size

    def read(self) -> bytes:
        return read_range(self.shard, self.offset, self._size)


# A caption is known (str), absent (None), or read lazily in the worker by a loader that returns
# the text or raises ImageRejected("missing_caption", why).
Caption = str | None | Callable[[], str]


@dataclass(frozen=True)
class Item:
    path: str
    source: FileSource | TarMemberSource | None = None
    caption: Caption = None
    problem: tuple[str, str] | None = None  # found by the reader: the item is quarantined as is


def _problem(path: str, reason: str, detail: str) -> Item:
    return Item(path=_printable(path), problem=(reason, detail))


def _printable(text: str) -> str:
    """`text` if it is valid UTF-8 text, else a readable stand-in (Parquet strings must be UTF-8)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _undecodable_name(path: str) -> Item | None:
    if _printable(path) == path:
        return None
    return _problem(path, "unreadable", "file name is not valid UTF-8; rename the file")


def _caption_text(raw: bytes) -> str:
    return raw.decode("utf-8-sig", errors="replace")


def _caption_from_json(raw: bytes, what: str) -> str:
    try:
        obj = json.loads(raw.decode("utf-8-sig", errors="replace"))
    except ValueError as exc:
        raise ImageRejected("missing_caption", f"{what} is not valid JSON: {exc}") from None
    if isinstance(obj, dict):
        for key in CAPTION_JSON_KEYS:
            if isinstance(obj.get(key), str):
                return obj[key]
    raise ImageRejected("missing_caption", f"{what} has no string 'caption' or 'text' key")


def _txt_size_ok(size: int, limits: IngestConfig, what: str) -> None:
    # A UTF-8 character is at most 4 bytes: a bigger file is over the limit without reading it.
    if size > 4 * limits.max_caption_chars + 8:
        raise ImageRejected("caption_too_long", f"{what} is {size} bytes")


def _json_size_ok(size: int, limits: IngestConfig, what: str) -> None:
    if size > limits.max_file_bytes:
        raise ImageRejected("missing_caption", f"{what} is {size} bytes, over max_file_bytes")


# ---------------------------------------------------------------------------------------------
# Readers


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower().lstrip(".")


def list_folder(root: Path) -> tuple[list[str], list[Item]]:
    """Image files under `root` (recursive, hidden entries skipped) in walk order, and a problem
    item for each folder that could not be listed. Planning lists once; items read ranges."""
    walk_errors: list[OSError] = []
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_errors.append):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, name) for name in sorted(filenames)
                  if not name.startswith(".") and _ext(name) in IMAGE_EXTENSIONS]
    problems = [_problem(str(err.filename), "unreadable", f"cannot list folder: {err.strerror or err}")
                for err in walk_errors]
    return found, problems


def folder_items(paths: Iterable[str], limits: IngestConfig) -> Iterator[Item]:
    """Items of image files listed by list_folder, with their sidecar stem.txt or stem.json."""
    for path in paths:
        if bad := _undecodable_name(path):
            yield bad
            continue
        stem = os.path.splitext(path)[0]
        caption: Caption = None
        if os.path.isfile(f"{stem}.txt"):
            caption = _sidecar_loader(f"{stem}.txt", limits, as_json=False)
        elif os.path.isfile(f"{stem}.json"):
            caption = _sidecar_loader(f"{stem}.json", limits, as_json=True)
        yield Item(path=path, source=FileSource(path), caption=caption)


def _sidecar_loader(path: str, limits: IngestConfig, as_json: bool) -> Callable[[], str]:
    def load() -> str:
        what = f"sidecar {os.path.basename(path)}"
        try:
            size = os.stat(path).st_size
            (_json_size_ok if as_json else _txt_size_ok)(size, limits, what)
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise ImageRejected("missing_caption", f"{what} unreadable: {exc.strerror or exc}") from None
        return _caption_from_json(raw, what) if as_json else _caption_text(raw)

    return load


def _unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"absolute member path {name!r}"
    if ".." in parts:
        return f"member path {name!r} climbs out with '..'"
    if member.issym() or member.islnk():
        return f"link member {name!r} -> {member.linkname!r}"
    if member.isdev() or member.isfifo():
        return f"device or fifo member {name!r}"
    if member.issparse():
        return f"sparse member {name!r}"
    if not (member.isreg() or member.isdir()):
        return f"member {name!r} of unsupported type {member.type!r}"
    return None


def _scan_tar(shard: str) -> tuple[list[tarfile.TarInfo], str | None]:
    """Member headers only (no data is read); a damaged shard yields what precedes the damage."""
    try:
        with tarfile.open(shard, mode="r:") as tf:
            try:
                while tf.next() is not None:
                    pass
            except (tarfile.TarError, OSError, EOFError) as exc:
                return list(tf.members), f"stopped reading at a damaged header: {exc}"
            return list(tf.members), None
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [], f"not a readable uncompressed tar: {exc}"


def _wds_key(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything before the first dot of the base name.
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_webdataset(shard_path: Path | str, limits: IngestConfig) -> Iterator[Item]:
    """One img2dataset-style shard: key.jpg (etc.) with key.txt and/or key.json {"caption": ...}."""
    shard = os.path.abspath(shard_path)
    members, error = _scan_tar(shard)
    samples: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
    seen: set[str] = set()
    for member in members:
        ref = f"{shard}#{member.name}"
        reason = _unsafe_member_reason(member)
        if reason:
            yield _problem(ref, "unsafe_tar_member", reason)
            continue
        if member.isdir():
            continue
        if bad := _undecodable_name(ref):
            yield bad
            continue
        if member.name in seen:
            yield _problem(ref, "duplicate_tar_member", "repeated name; the last copy is used")
        seen.add(member.name)
        key, ext = _wds_key(member.name)
        samples[key][ext] = member
    for key in sorted(samples):
        parts = samples[key]
        caption: Caption = None
        if "txt" in parts:
            caption = _member_caption_loader(shard, parts["txt"], limits, as_json=False)
        elif "json" in parts:
            caption = _member_caption_loader(shard, parts["json"], limits, as_json=True)
        for ext in sorted(e for e in parts if e in IMAGE_EXTENSIONS):
            m = parts[ext]
            source = TarMemberSource(shard, m.offset_data, m.size)
            yield Item(path=f"{shard}#{m.name}", source=source, caption=caption)
    if error:
        yield _problem(shard, "unreadable", error)


def _member_caption_loader(shard: str, member: tarfile.TarInfo, limits: IngestConfig, as_json: bool):
    def load() -> str:
        what = f"member {member.name}"
        (_json_size_ok if as_json else _txt_size_ok)(member.size, limits, what)
        try:
            raw = read_range(shard, member.offset_data, member.size)
        except OSError as exc:
            raise ImageRejected("missing_caption", f"{what} unreadable: {exc}") from None
        return _caption_from_json(raw, what) if as_json else _caption_text(raw)

    return load


_BAD = object()  # marks a manifest row that could not be parsed; its caption slot holds why


def _manifest_rows(path: Path, path_col: str, caption_col: str) -> Iterator[tuple[str, Any, Any]]:
    """(row label, path value, caption value) per manifest row, streamed."""
    ext = _ext(path.name)

    def missing(cols: list[str]) -> list[str]:
        return [c for c in (path_col, caption_col) if c not in cols]

    hint = "set ingest.columns.path / ingest.columns.caption"
    if ext == "parquet":
        try:
            pfile = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise IngestError(f"{path}: not a readable Parquet file ({exc})") from None
        names = pfile.schema_arrow.names
        if missing(names):
            raise IngestError(f"{path}: no column(s) {missing(names)} (has {names}); {hint}")
        row = 0
        for batch in pfile.iter_batches(batch_size=8192, columns=[path_col, caption_col]):
            for p, c in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                row += 1
                yield f"{path}:row {row}", p, c
    elif ext in ("jsonl", "ndjson"):
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            checked = False
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                label = f"{path}:line {lineno}"
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    yield label, _BAD, f"not valid JSON: {exc}"
                    continue
                if not isinstance(obj, dict):
                    yield label, _BAD, f"expected a JSON object, got {type(obj).__name__}"
                    continue
                if not checked and path_col not in obj:
                    raise IngestError(
                        f"{path}: first row has no key '{path_col}' (has {sorted(obj)}); {hint}"
                    )
                checked = True
                yield label, obj.get(path_col), obj.get(caption_col)
    elif ext == "csv":
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
            reader = csv.DictReader(fh)
            names = reader.fieldnames or []
            if missing(names):
                raise IngestError(f"{path}: no column(s) {missing(names)} (has {names}); {hint}")
            for row in reader:
                yield f"{path}:line {reader.line_num}", row.get(path_col), row.get(caption_col)
    else:
        raise IngestError(f"{path}: manifest must be .parquet, .jsonl or .csv")


def _within(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def manifest_rows(manifest: Path, cfg: IngestConfig) -> int:
    """How many rows the manifest has (a streamed pass that also checks its columns)."""
    return sum(1 for _ in _manifest_rows(manifest, cfg.columns.path, cfg.columns.caption))


def read_manifest(manifest: Path, cfg: IngestConfig, start: int = 0, stop: int | None = None) -> Iterator[Item]:
    """Items of manifest rows [start, stop)."""
    base = os.path.dirname(os.path.abspath(manifest))
    # Relative allowed_roots are relative to the manifest, like the paths in it.
    roots = [os.path.realpath(os.path.join(base, os.path.expanduser(r))) for r in cfg.allowed_roots]
    roots = roots or [os.path.realpath(base)]
    rows = islice(_manifest_rows(manifest, cfg.columns.path, cfg.columns.caption), start, stop)
    for label, raw_path, raw_caption in rows:
        if raw_path is _BAD:
            yield _problem(label, "bad_manifest_row", str(raw_caption))
            continue
        try:
            yield _manifest_item(label, raw_path, raw_caption, base, roots, cfg)
        except (ValueError, OSError) as exc:  # e.g. a NUL byte in the path
            yield _problem(label, "bad_manifest_row", f"{type(exc).__name__}: {exc}")


def _manifest_item(
    label: str, raw_path: Any, raw_caption: Any, base: str, roots: list[str], cfg: IngestConfig
) -> Item:
    if not isinstance(raw_path, str) or not raw_path.strip():
        return _problem(label, "bad_manifest_row", f"path column '{cfg.columns.path}' is empty")
    if "://" in raw_path:
        return _problem(raw_path, "unreadable", "URLs are not fetched; download them first")
    if bad := _undecodable_name(raw_path):
        return bad
    joined = os.path.normpath(os.path.join(base, os.path.expanduser(raw_path.strip())))
    real = os.path.realpath(joined)  # symlinks and '..' resolved before the root check
    if not _within(real, roots):
        return _problem(joined, "path_outside_allowed_roots", f"resolves to {real}, outside {roots}")
    caption = raw_caption if raw_caption is None or isinstance(raw_caption, str) else str(raw_caption)
    return Item(path=real, source=FileSource(real), caption=caption)


def detect_reader(corpus: Path, reader: str) -> tuple[str, list[Path]]:
    """(reader name, inputs) for a corpus path; `reader` is the configured choice or "auto"."""
    if not corpus.exists():
        raise IngestError(f"{corpus}: corpus path does not exist")
    if corpus.is_file():
        ext = _ext(corpus.name)
        kind = "webdataset" if ext == "tar" else "manifest" if ext in MANIFEST_EXTENSIONS else None
        if kind is None:
            raise IngestError(
                f"{corpus}: unsupported corpus file; pass a folder, a .tar shard "
                "or a .parquet/.jsonl/.csv manifest"
            )
        if reader not in ("auto", kind):
            raise IngestError(f"{corpus}: ingest.reader is '{reader}' but this is a {kind} file")
        return kind, [corpus]
    shards = sorted(p for p in corpus.iterdir() if p.is_file() and _ext(p.name) == "tar")
    if reader == "manifest":
        raise IngestError(f"{corpus}: reader 'manifest' needs a .parquet/.jsonl/.csv file, not a folder")
    if reader == "webdataset" or (reader == "auto" and shards):
        if not shards:
            raise IngestError(f"{corpus}: reader 'webdataset' found no .tar shards in this folder")
        return "webdataset", shards
    return "folder", [corpus]
