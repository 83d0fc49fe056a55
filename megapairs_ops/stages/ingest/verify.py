"""Verifying one corpus item: read its bytes within the limits, hash them, decode the image
(decompression-bomb limit; CMYK, palette, 16-bit and alpha converted), compute its perceptual
hash, resolve its caption. Every problem becomes a quarantine reason, never an exception."""

from __future__ import annotations

import hashlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Iterable, Iterator

from megapairs_ops.config import IngestConfig
from megapairs_ops.media import ImageRejected, decode_rgb, phash64

from .readers import FileSource, Item, TarMemberSource, _printable

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


def verify_all(items: Iterable[Item], cfg: IngestConfig, workers: int) -> Iterator[Verdict]:
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
