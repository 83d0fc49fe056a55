"""Reading, decoding and hashing images the same way in every stage.

Decoding is where hostile or broken input bites, so every failure here is an `ImageRejected`
with a machine-readable reason; callers turn it into a quarantine row instead of crashing.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Only formats with in-process, sandbox-free decoders: Image.open would otherwise also try plugins
# such as EPS, which shells out to Ghostscript on load.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is a snake_case code for the quarantine table."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Reading bytes: plain files and "shard.tar#member" references


def split_tar_ref(ref: str) -> tuple[str, str] | None:
    """Split "/abs/shard.tar#member" into (tar path, member); None for a plain file path.

    A plain file name may itself contain '#', so a split only counts where the left side is an
    existing .tar file.
    """
    start = 0
    while (i := ref.find("#", start)) != -1:
        head = ref[:i]
        if head.lower().endswith(".tar") and os.path.isfile(head):
            return head, ref[i + 1 :]
        start = i + 1
    return None


@functools.lru_cache(maxsize=32)
def _tar_index(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) for the regular files of one shard.

    Keyed on mtime/size so a rewritten shard is re-indexed; cached because embedding stages read
    thousands of members from the same shard, and re-scanning its headers per member is quadratic.
    """
    index: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tf:
        try:
            for member in tf:
                if member.isreg():
                    index[member.name] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError):
            pass  # a damaged tail: members before the damage stay readable, as ingest saw them
    return index


def tar_member_index(path: str) -> dict[str, tuple[int, int]]:
    st = os.stat(path)
    return _tar_index(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def read_range(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{path}: expected {size} bytes at offset {offset}, got {len(data)}")
    return data


def read_image_bytes(ref: str) -> bytes:
    """The raw bytes of an image given its `path` as written in images.parquet."""
    tar_ref = split_tar_ref(ref)
    if tar_ref is None:
        return Path(ref).read_bytes()
    shard, member = tar_ref
    entry = tar_member_index(shard).get(member)
    if entry is None:
        raise FileNotFoundError(f"{shard}: no regular member named {member!r}")
    return read_range(shard, *entry)


# ---------------------------------------------------------------------------------------------
# Decoding


def _classify_load_error(exc: BaseException) -> ImageRejected:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncat" in text.lower():
        return ImageRejected("truncated_image", text)
    return ImageRejected("corrupt_image", f"{type(exc).__name__}: {text}")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images scaled to 0..255; Pillow's convert() would clip."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.uint32) // 257
    elif img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        out = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
    else:  # "I": 32-bit signed, usually holding 8- or 16-bit data
        arr = arr.astype(np.int64)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 255:
            out = arr
        elif lo >= 0 and hi <= 65535:
            out = arr // 257
        else:
            out = (arr - lo) * 255 // max(hi - lo, 1)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return _to_8bit_gray(img).convert("RGB")
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        # Transparent pixels hold arbitrary colours (often black); show them as white paper.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode fully into 8-bit RGB; returns (image, the file's original Pillow mode).

    The pixel budget is checked on the header size before any pixel is decoded. Pillow's own
    decompression-bomb guard is left as it is (it is process-global), so the effective limit is
    the smaller of `max_pixels` and Pillow's hard limit (2 * Image.MAX_IMAGE_PIXELS).
    """
    if not data:
        raise ImageRejected("empty_file", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a JPEG/PNG/WebP/BMP/GIF/TIFF image") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a broken header can raise almost anything
        raise _classify_load_error(exc) from None
    # No `with img:` here: closing the file object would also invalidate `img` when it is
    # returned as is (RGB input); the BytesIO is released with the image.
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            "too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
        )
    source_mode = img.mode
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise _classify_load_error(exc) from None
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose a good picture
        pass
    try:
        rgb = _to_rgb(img)
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported_mode", f"mode {source_mode}: {exc}") from None
    return rgb, source_mode


def load_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes into an 8-bit RGB image (see `decode_rgb`)."""
    return decode_rgb(data, max_pixels)[0]


# ---------------------------------------------------------------------------------------------
# Perceptual hash


@functools.lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: row k is the k-th cosine; D @ x is the DCT of x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    mat = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    mat[0] /= np.sqrt(2.0)
    return mat


def phash64(img: Image.Image) -> int:
    """64-bit DCT perceptual hash as a signed int64-compatible int (bit 63 is the first coefficient).

    Grayscale 32x32, 2D DCT, the top-left 8x8 low frequencies; each bit says whether that
    coefficient is above the median of the 63 non-DC coefficients (the DC term only measures
    overall brightness, so it would skew the median).
    """
    gray = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
    pixels = np.asarray(gray, dtype=np.float64)
    dct = _dct_matrix(32)
    low = (dct @ pixels @ dct.T)[:8, :8].ravel()
    median = np.median(low[1:])
    value = 0
    for bit in low > median:
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming64(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes (signed or unsigned representation)."""
    return ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()
