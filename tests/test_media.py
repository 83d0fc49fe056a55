import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

from megapairs_ops.media import (
    ImageRejected,
    decode_rgb,
    hamming64,
    load_rgb,
    phash64,
    read_image_bytes,
    split_tar_ref,
)
from tests.fixtures.corpus import write_huge_png

BIG = 10**8


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        r = int(rng.integers(8, 20))
        draw.ellipse((x, y, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def test_read_image_bytes_from_file_and_tar_member(tmp_path):
    data = encode(picture())
    odd_name = tmp_path / "a#b.png"  # '#' in a plain file name is not a tar reference
    odd_name.write_bytes(data)
    assert read_image_bytes(str(odd_name)) == data
    assert split_tar_ref(str(odd_name)) is None

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        for name, payload in [("000.txt", b"caption"), ("sub/001.png", data)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    ref = f"{shard}#sub/001.png"
    assert split_tar_ref(ref) == (str(shard), "sub/001.png")
    assert read_image_bytes(ref) == data
    with pytest.raises(FileNotFoundError):
        read_image_bytes(f"{shard}#missing.png")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16"])
def test_every_mode_becomes_8bit_rgb(mode):
    src = picture(1)
    img = src.convert(mode) if mode not in ("I", "I;16") else src.convert("L")
    if mode in ("I", "I;16"):
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
        if mode == "I":
            img = img.convert("I")
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I" else "PNG"
    rgb, source_mode = decode_rgb(encode(img, fmt), BIG)
    assert (rgb.mode, rgb.size) == ("RGB", src.size)
    assert source_mode == mode
    if mode in ("L", "I", "I;16"):
        # 16-bit values are scaled, not clipped: the picture survives as the same grey levels.
        expected = np.asarray(src.convert("L"), np.int16)
        assert np.abs(np.asarray(rgb.convert("L"), np.int16) - expected).max() <= 1


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (20, 10), (200, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 10))  # left half fully transparent black
    rgb = load_rgb(encode(rgba), BIG)
    assert rgb.getpixel((2, 2)) == (255, 255, 255)
    assert rgb.getpixel((15, 5)) == (200, 0, 0)

    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.paste(1, (5, 0, 10, 10))
    rgb = load_rgb(encode(pal, transparency=0), BIG)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((7, 7)) == (10, 200, 10)


def test_pixel_budget_is_checked_from_the_header_before_decoding():
    data = encode(picture(2, (300, 200)))
    header_only = data[:100]  # IHDR says 300x200; the pixel data is gone
    with pytest.raises(ImageRejected) as err:
        load_rgb(header_only, max_pixels=50_000)
    assert err.value.reason == "too_large"
    with pytest.raises(ImageRejected) as err:
        load_rgb(header_only, max_pixels=BIG)
    assert err.value.reason == "truncated_image"
    assert load_rgb(data, max_pixels=60_000).size == (300, 200)


def test_decompression_bomb_is_refused_and_global_limit_untouched(tmp_path):
    bomb = tmp_path / "bomb.png"
    write_huge_png(bomb)
    assert bomb.stat().st_size < 100_000
    before = Image.MAX_IMAGE_PIXELS
    for limit in (BIG, 10**12):  # even a generous budget cannot unlock a 400 MP bomb
        with pytest.raises(ImageRejected) as err:
            load_rgb(bomb.read_bytes(), max_pixels=limit)
        assert err.value.reason == "too_large"
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (b"just some text, not pixels\n" * 3, "not_an_image"),
        (encode(picture(3), "JPEG")[:-400], "truncated_image"),
        (encode(picture(3), "PNG")[:-30], "truncated_image"),
    ],
)
def test_broken_bytes_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageRejected) as err:
        load_rgb(data, BIG)
    assert err.value.reason == reason
    assert err.value.detail


def test_corrupt_png_chunk_is_corrupt_image():
    data = bytearray(encode(picture(4)))
    idat = data.index(b"IDAT")
    data[idat + 10 : idat + 30] = b"\xff" * 20  # garbage inside the compressed stream
    with pytest.raises(ImageRejected) as err:
        load_rgb(bytes(data), BIG)
    assert err.value.reason in ("corrupt_image", "truncated_image")


def test_exif_orientation_is_applied():
    img = picture(5, (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb = load_rgb(encode(img, "JPEG", exif=exif.tobytes()), BIG)
    assert rgb.size == (40, 80)


def test_decoding_is_thread_safe():
    blobs = [encode(picture(s), "PNG" if s % 2 else "JPEG") for s in range(24)]
    serial = [np.asarray(load_rgb(b, BIG)).tobytes() for b in blobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda b: np.asarray(load_rgb(b, BIG)).tobytes(), blobs))
    assert parallel == serial


def test_phash_is_stable_under_small_changes_and_separates_pictures():
    a = picture(10, (128, 128))
    same = phash64(a)
    assert phash64(a.copy()) == same
    assert -(2**63) <= same < 2**63
    recompressed = load_rgb(encode(a.resize((100, 100)), "JPEG", quality=70), BIG)
    assert hamming64(same, phash64(recompressed)) <= 6
    others = [phash64(picture(s, (128, 128))) for s in range(11, 21)]
    assert min(hamming64(same, h) for h in others) > 10
    flat = phash64(Image.new("RGB", (50, 50), (90, 90, 90)))
    assert -(2**63) <= flat < 2**63


def test_phash_uses_an_orthonormal_dct():
    from megapairs_ops.media import _dct_matrix

    d = _dct_matrix(32)
    assert np.allclose(d @ d.T, np.eye(32), atol=1e-10)
    x = np.random.default_rng(0).random(32)
    k = 3
    naive = np.sqrt(2 / 32) * sum(x[i] * np.cos(np.pi * (2 * i + 1) * k / 64) for i in range(32))
    assert np.isclose((d @ x)[k], naive)


def test_hamming64():
    assert hamming64(0, 0) == 0
    assert hamming64(0, -1) == 64
    assert hamming64(5, 6) == 2
    assert hamming64(-(2**63), 0) == 1
