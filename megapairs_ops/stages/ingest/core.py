"""Ingest: read a captioned corpus, verify every item, collapse exact duplicates.

Readers only enumerate items (a reference, a way to get the bytes, a caption or a way to get it);
all reading, hashing and decoding happens in worker threads, one item at a time, so memory holds
metadata rows and a bounded number of images in flight, never the corpus.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import IngestConfig, PipelineConfig
from megapairs_ops.media import ImageRejected, decode_rgb, phash64, read_range
from megapairs_ops.storage import QUARANTINE_SCHEMA, RunLayout, write_parquet, write_problem_rows

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
MANIFEST_EXTENSIONS = frozenset({"parquet", "jsonl", "ndjson", "csv"})
CAPTION_JSON_KEYS = ("caption", "text")

QUARANTINE_REASONS = (
    "unreadable",
    "empty_file",
    "file_too_large",
    "not_an_image",
    "truncated_image",
    "corrupt_image",
    "unsupported_mode",
    "too_large",
    "too_small",
    "missing_caption",
    "blank_caption",
    "caption_too_long",
    "path_outside_allowed_roots",
    "bad_manifest_row",
    "unsafe_tar_member",
    "duplicate_tar_member",
)

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("sha256", pa.string()),
        ("path", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("phash", pa.int64()),
        ("file_bytes", pa.int64()),
        ("duplicate_paths", pa.list_(pa.string())),
    ]
)


class IngestError(ValueError):
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


def read_folder(root: Path, limits: IngestConfig) -> Iterator[Item]:
    """Images under `root` (recursive, hidden entries skipped) with sidecar stem.txt / stem.json."""
    walk_errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_errors.append):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        present = set(filenames)
        for name in sorted(filenames):
            if name.startswith(".") or _ext(name) not in IMAGE_EXTENSIONS:
                continue
            if bad := _undecodable_name(os.path.join(dirpath, name)):
                yield bad
                continue
            stem = os.path.splitext(name)[0]
            txt, js = f"{stem}.txt", f"{stem}.json"
            caption: Caption = None
            if txt in present:
                caption = _sidecar_loader(os.path.join(dirpath, txt), limits, as_json=False)
            elif js in present:
                caption = _sidecar_loader(os.path.join(dirpath, js), limits, as_json=True)
            yield Item(path=os.path.join(dirpath, name), source=FileSource(os.path.join(dirpath, name)),
                       caption=caption)
    for err in walk_errors:
        yield _problem(str(err.filename), "unreadable", f"cannot list folder: {err.strerror or err}")


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


def read_webdataset(shards: list[Path], limits: IngestConfig) -> Iterator[Item]:
    """img2dataset-style shards: key.jpg (etc.) with key.txt and/or key.json {"caption": ...}."""
    for shard_path in shards:
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


def read_manifest(manifest: Path, cfg: IngestConfig) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(manifest))
    # Relative allowed_roots are relative to the manifest, like the paths in it.
    roots = [os.path.realpath(os.path.join(base, os.path.expanduser(r))) for r in cfg.allowed_roots]
    roots = roots or [os.path.realpath(base)]
    for label, raw_path, raw_caption in _manifest_rows(manifest, cfg.columns.path, cfg.columns.caption):
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


def iter_items(cfg: IngestConfig, corpus: Path) -> tuple[str, Iterator[Item]]:
    kind, inputs = detect_reader(corpus, cfg.reader)
    if kind == "folder":
        return kind, read_folder(inputs[0], cfg)
    if kind == "manifest":
        return kind, read_manifest(inputs[0], cfg)
    return kind, read_webdataset(inputs, cfg)


# ---------------------------------------------------------------------------------------------
# Verification


def _resolve_caption(item: Item, cfg: IngestConfig) -> str:
    caption = item.caption
    if callable(caption):
        caption = caption()
    if caption is None:
        raise ImageRejected("missing_caption", "no sidecar .txt/.json, caption member or caption column")
    caption = _printable(caption).strip()
    if not caption:
        raise ImageRejected("blank_caption", "caption is empty or only whitespace")
    if len(caption) > cfg.max_caption_chars:
        raise ImageRejected(
            "caption_too_long", f"{len(caption)} characters > max_caption_chars {cfg.max_caption_chars}"
        )
    return caption


def _read_checked(source: FileSource | TarMemberSource, cfg: IngestConfig) -> bytes:
    try:
        size = source.size()
        if size == 0:
            raise ImageRejected("empty_file", "0 bytes")
        if size > cfg.max_file_bytes:
            raise ImageRejected("file_too_large", f"{size} bytes > max_file_bytes {cfg.max_file_bytes}")
        data = source.read()
    except FileNotFoundError:
        raise ImageRejected("unreadable", "file not found") from None
    except OSError as exc:
        raise ImageRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    if len(data) > cfg.max_file_bytes:  # the file grew between stat and read
        raise ImageRejected("file_too_large", f"{len(data)} bytes > max_file_bytes {cfg.max_file_bytes}")
    if not data:
        raise ImageRejected("empty_file", "0 bytes")
    return data


Verdict = tuple[bool, tuple]


def verify_item(item: Item, cfg: IngestConfig) -> Verdict:
    """(True, image row) or (False, (path, reason, detail)); never raises."""
    try:
        if item.problem is not None:
            return False, (item.path, *item.problem)
        data = _read_checked(item.source, cfg)
        sha = hashlib.sha256(data).hexdigest()
        rgb, mode = decode_rgb(data, cfg.max_pixels)
        width, height = rgb.size
        if min(width, height) < cfg.min_side:
            raise ImageRejected("too_small", f"{width}x{height}, shorter side < min_side {cfg.min_side}")
        phash = phash64(rgb)
        caption = _resolve_caption(item, cfg)
        return True, (sha, item.path, caption, width, height, mode, phash, len(data))
    except ImageRejected as rej:
        return False, (item.path, rej.reason, rej.detail)
    except Exception as exc:  # noqa: BLE001 - one odd file must not end the run
        return False, (item.path, "corrupt_image", f"{type(exc).__name__}: {exc}")


def _verify_all(items: Iterable[Item], cfg: IngestConfig, workers: int) -> Iterator[Verdict]:
    """verify_item over items with at most a few items per worker in flight (bounded memory)."""
    if workers <= 1:
        yield from (verify_item(item, cfg) for item in items)
        return
    window = workers * 4
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        pending: set = set()
        for item in items:
            pending.add(pool.submit(verify_item, item, cfg))
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        for future in pending:
            yield future.result()


# ---------------------------------------------------------------------------------------------
# The stage


def ingest_corpus(
    cfg: PipelineConfig,
    corpus: str | Path,
    layout: RunLayout,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Verify and deduplicate a corpus into layout.images; problems go to the ingest quarantine part."""
    corpus = Path(os.path.abspath(Path(corpus).expanduser()))
    icfg = cfg.ingest
    try:
        kind, items = iter_items(icfg, corpus)
    except OSError as exc:
        raise IngestError(f"{corpus}: cannot read the corpus: {exc.strerror or exc}") from None
    workers = workers or os.cpu_count() or 1

    by_sha: dict[str, list[tuple]] = defaultdict(list)
    quarantine: list[tuple[str, str, str]] = []
    seen = 0
    from tqdm.auto import tqdm

    try:
        # The corpus size is unknown until the readers finish, so the bar counts without a total.
        for ok, payload in tqdm(_verify_all(items, icfg, workers), desc="ingest", unit="item", disable=not progress):
            seen += 1
            if ok:
                by_sha[payload[0]].append(payload)
            else:
                path, reason, detail = payload
                quarantine.append((path, reason, _printable(detail)))
    except OSError as exc:  # the manifest or folder itself became unreadable part-way
        raise IngestError(f"{corpus}: reading stopped: {exc.strerror or exc}") from None

    images: list[tuple] = []
    collapsed = 0
    for sha, rows in by_sha.items():
        rows.sort(key=lambda r: (r[1], r[2]))  # by path, then caption: thread order must not matter
        keep = rows[0]
        others = sorted({r[1] for r in rows[1:]} - {keep[1]})
        images.append((sha[:16], *keep, others))
        collapsed += len(rows) - 1
    images.sort(key=lambda r: r[0])
    quarantine.sort()

    write_problem_rows(
        [{"path": p, "reason": r, "detail": d, "stage": "ingest"} for p, r, d in quarantine],
        QUARANTINE_SCHEMA,
        layout.quarantine_part("ingest"),
    )
    if seen == 0:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise IngestError(f"{corpus}: no images found by the {kind} reader (looked for {exts})")
    if not images:
        where = layout.quarantine_part("ingest")
        raise IngestError(f"{corpus}: none of the {seen} items is usable; reasons are in {where}")
    columns = {name: list(col) for name, col in zip(IMAGES_SCHEMA.names, zip(*images))}
    table = pa.table(columns, schema=IMAGES_SCHEMA)
    write_parquet(table, layout.images)
    return {
        "reader": kind,
        "items_seen": seen,
        "images": len(images),
        "quarantined": len(quarantine),
        "duplicates_collapsed": collapsed,
        "quarantine_by_reason": dict(sorted(Counter(r for _, r, _ in quarantine).items())),
    }
