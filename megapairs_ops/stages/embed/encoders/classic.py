"""Weight-free encoders for the demo profile: numpy + Pillow only, deterministic, CPU.

They stand in for the paper's three views (CLIP image, DINOv2, CLIP text) on the synthetic sample
corpus, and their similarity scale is calibrated so that the paper's 0.8..0.96 band keeps related,
non-duplicate pairs:
- Raw histogram features are non-negative, so any two images would score a cosine near 1 and the
  band would select noise. Image feature blocks are therefore centred by fixed offsets (mid-grey,
  a typical texture energy) or built in a zero-mean basis, so unrelated images score low.
- Bag-of-words cosines are the opposite: even paraphrases rarely reach 0.8. The text view adds a
  fixed component shared by every caption, as CLIP's text space has.
Offsets, weights and the shared component are constants of FEATURE_VERSION, never fitted to the
corpus being embedded. Every image is squashed to a square first: layouts compare in relative
coordinates, whatever the aspect ratio.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
from PIL import Image

from megapairs_ops.config import EncoderConfig
from megapairs_ops.stages.embed.encoders import EncodeInputError, Encoder, l2_normalise

FEATURE_VERSION = "1"

# ---------------------------------------------------------------------------------------------
# Colour


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> CIE Lab (D65): L in 0..100, a/b roughly -100..100 with grey at 0."""
    c = rgb.astype(np.float32) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]], np.float32
    )
    xyz /= np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def _thumbnail(image: Image.Image, side: int, mode: str = "RGB") -> np.ndarray:
    small = image.convert(mode).resize((side, side), Image.Resampling.BOX, reducing_gap=2.0)
    return np.asarray(small)


def _soft_histogram(values: np.ndarray, centres: np.ndarray, width: float) -> np.ndarray:
    """Histogram with Gaussian soft assignment, so a small shift of colour moves mass smoothly."""
    d2 = (values * values).sum(1)[:, None] + (centres * centres).sum(1)[None, :] - 2.0 * values @ centres.T
    member = np.exp(-np.maximum(d2, 0.0) / (2 * width * width))
    member /= member.sum(1, keepdims=True) + 1e-12
    return member.sum(0)


# Lab palette centres for the colour histogram: a 5x5x5 grid over the gamut.
_LAB_CENTRES = np.array(
    [(L, a, b) for L in (10, 30, 50, 70, 90) for a in (-60, -30, 0, 30, 60) for b in (-60, -30, 0, 30, 60)],
    np.float32,
)
_LAYOUT_GRID = 10
# Log-compressed histogram masses: a small object (a few % of the pixels) then weighs almost as much
# as the background that covers most of the picture, so "same background, other objects" is less
# similar than "same objects, moved", as it is to a person.
_HIST_EPS = 0.003
# Slightly below the mean compressed bin value, so empty bins are weakly negative: two images that
# share no colours score below 0 on this block rather than exactly 0.
_HIST_OFFSET = 0.02


def _unit_block(x: np.ndarray, weight: float) -> np.ndarray:
    """Scale one feature block to norm sqrt(weight), so each block's share of the cosine is fixed."""
    norm = float(np.linalg.norm(x))
    return x * (np.sqrt(weight) / max(norm, 1e-6 * np.sqrt(x.size)))


def color_layout_features(image: Image.Image) -> np.ndarray:
    # Spatial layout: Lab on a 10x10 grid, centred on mid-grey (L=50, a=b=0), so dark/light and
    # opposite hues point in opposite directions instead of all sharing the positive orthant.
    lab_grid = _srgb_to_lab(_thumbnail(image, _LAYOUT_GRID)).reshape(-1, 3)
    layout = (lab_grid - np.array([50, 0, 0], np.float32)) / 50.0
    lab = _srgb_to_lab(_thumbnail(image, 32)).reshape(-1, 3)
    hist = _soft_histogram(lab, _LAB_CENTRES, 10.0)
    hist = np.log1p(hist / hist.sum() / _HIST_EPS) / np.log1p(1 / _HIST_EPS) - _HIST_OFFSET
    return np.concatenate([_unit_block(layout.ravel(), 0.5), _unit_block(hist, 0.5)]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Texture


def _gradients(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
    gy[1:-1, :] = gray[2:, :] - gray[:-2, :]
    return np.hypot(gx, gy), np.arctan2(gy, gx)


def _cells(a: np.ndarray, grid: int) -> np.ndarray:
    """(H, W, ...) -> (grid*grid, H/grid * W/grid, ...): the pixels of each cell of a grid x grid split."""
    h, w = a.shape[:2]
    ch, cw = h // grid, w // grid
    a = a[: ch * grid, : cw * grid].reshape(grid, ch, grid, cw, *a.shape[2:])
    return np.moveaxis(a, 2, 1).reshape(grid * grid, ch * cw, *a.shape[4:])


# log1p(gradient magnitude) of a moderately textured cell; centring on it makes flat and busy cells
# point in opposite directions.
_ENERGY_CENTRE = 2.5


def _energy_block(mag: np.ndarray, grid: int) -> np.ndarray:
    """Per cell: quantiles of gradient magnitude (log). The median ignores the few object pixels in a
    cell, so it describes the background's texture; the upper quantiles see the objects' edges."""
    quantiles = np.percentile(_cells(mag, grid), (25, 50, 75, 90), axis=1).T
    return (np.log1p(quantiles) - _ENERGY_CENTRE).ravel()


def _orientation_block(mag: np.ndarray, theta: np.ndarray, grid: int) -> np.ndarray:
    """Per cell: the 2nd and 4th angular harmonics of gradient direction, magnitude-weighted.

    An orientation histogram expressed in a zero-mean basis: isotropic or edge-free cells give 0
    instead of a constant positive vector, and weak edges are damped towards 0.
    """
    harmonics = np.stack([np.cos(2 * theta), np.sin(2 * theta), np.cos(4 * theta), np.sin(4 * theta)], -1)
    m = _cells(mag, grid)
    total = m.sum(1)
    orient = (m[..., None] * _cells(harmonics, grid)).sum(1) / (total[:, None] + 1e-6)
    strength = np.minimum(total / (m.shape[1] * 4.0), 1.0)[:, None]
    return (orient * strength).ravel()


def texture_features(image: Image.Image) -> np.ndarray:
    blocks = []
    # Two scales: 64 px sees fine patterns (noise, narrow stripes), 32 px the coarse ones.
    for side in (64, 32):
        mag, theta = _gradients(_thumbnail(image, side, "L").astype(np.float32))
        blocks.append(_unit_block(_energy_block(mag, 4), 0.25))
        blocks.append(_unit_block(_orientation_block(mag, theta, 4), 0.25))
    return np.concatenate(blocks).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Text

_STOPWORDS = frozenset(
    "a an the and or of on in at to by with for from into onto over under as is are was were be "
    "this that these those it its their there here some".split()
)
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def text_tokens(text: str) -> list[str]:
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _bucket(token: str, dim: int) -> tuple[int, float]:
    # blake2b, not hash(): Python salts str hashes per process, which would change every vector.
    h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return (h >> 1) % dim, 1.0 if h & 1 else -1.0


# Bag-of-words cosines put captions that share most content words at 0.6..0.9 and unrelated ones
# near 0.1. CLIP's text space, which this view stands in for, has a large component that every
# caption shares; one constant coordinate of the same norm as the word part reproduces that, giving
# cosine' = (cosine + 1) / 2, so near-paraphrases land in the paper's 0.8..0.96 band.
_COMMON_WEIGHT = 1.0


def text_hash_features(text: str, dim: int) -> np.ndarray:
    """Signed feature hashing of word unigrams + bigrams into dim - 1 buckets, plus the common coordinate.

    All zeros when the text has no content words.
    """
    counts: dict[str, int] = {}
    for token in text_tokens(text):
        counts[token] = counts.get(token, 0) + 1
    vec = np.zeros(dim, np.float32)
    for token, tf in counts.items():
        index, sign = _bucket(token, dim - 1)
        # Sublinear tf: a word repeated five times is not five times more telling.
        vec[index] += sign * (1.0 + np.log(tf))
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        return vec
    vec /= norm
    vec[dim - 1] = _COMMON_WEIGHT
    return vec


# ---------------------------------------------------------------------------------------------
# Encoders


def _fixed_projection(native: int, dim: int, kind: str) -> np.ndarray | None:
    """None when `dim` >= native (zero-padding keeps cosines exact); else a seeded Gaussian map.

    The seed depends only on the kind, so every run on every machine uses the same matrix.
    """
    if dim >= native:
        return None
    digest = hashlib.blake2b(f"{kind}:{FEATURE_VERSION}".encode(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little")
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((native, dim)) / np.sqrt(dim)).astype(np.float32)


class _ClassicImageEncoder(Encoder):
    modality = "image"

    def __init__(self, enc: EncoderConfig, features, native_dim: int, description: str) -> None:
        self.name = enc.name
        self.dim = enc.dim
        self._features = features
        self._native = native_dim
        self._projection = _fixed_projection(native_dim, enc.dim, enc.kind)
        self.identity = _identity(enc, description)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        vec = self._features(image)
        if not np.isfinite(vec).all() or not vec.any():
            raise EncodeInputError("no_features", "the image gives an all-zero or non-finite feature vector")
        # Projected per item, not per batch: a row must not depend on which batch it was in.
        if self._projection is not None:
            return vec @ self._projection
        out = np.zeros(self.dim, np.float32)
        out[: self._native] = vec
        return out

    def encode_prepared(self, items: list[np.ndarray]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.stack(items))


class ClassicTextHashEncoder(Encoder):
    modality = "text"

    def __init__(self, enc: EncoderConfig) -> None:
        self.name = enc.name
        self.dim = enc.dim
        self.identity = _identity(
            enc,
            "lower-case words minus stopwords, unigrams+bigrams, blake2b signed hashing, 1+log(tf), "
            f"common coordinate weight {_COMMON_WEIGHT}",
        )

    def prepare_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise EncodeInputError("empty_caption", "the caption is empty; the caption view has nothing to encode")
        vec = text_hash_features(text, self.dim)
        if not vec.any():
            raise EncodeInputError("no_features", "the caption has no words outside the stopword list")
        return vec

    def encode_prepared(self, items: list[np.ndarray]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.stack(items))


def _identity(enc: EncoderConfig, description: str) -> dict[str, Any]:
    return {
        "kind": enc.kind,
        "model": None,
        "revision": FEATURE_VERSION,
        "dtype": "float32",
        "dim": enc.dim,
        "preprocessing": description,
    }


_PROBE = Image.new("RGB", (64, 64), (128, 128, 128))


def build(enc: EncoderConfig) -> Encoder:
    if enc.kind == "classic_text_hash":
        return ClassicTextHashEncoder(enc)
    if enc.kind == "classic_color_layout":
        features = color_layout_features
        description = "Lab 10x10 grid centred on mid-grey + log-compressed soft 125-bin Lab histogram"
    elif enc.kind == "classic_texture":
        features = texture_features
        description = "gradient-magnitude quantiles + 2nd/4th orientation harmonics, 4x4 cells, 64+32 px"
    else:
        raise ValueError(f"encoder kind '{enc.kind}' is not a classic kind")
    return _ClassicImageEncoder(enc, features, len(features(_PROBE)), description)
