"""A deterministic synthetic captioned corpus, so the demo profile needs no download.

Scenes come in families whose members are related along different axes (same objects on another
background, same palette with other shapes, same content re-laid-out, same background with other
objects, one count changed), so that colour-layout, texture and caption encoders each find pairs
in the 0.8..0.96 band, much as the real encoders do on web images.
"""

from __future__ import annotations

import io
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from megapairs_ops.storage import atomic_dir, read_json, write_json

# Bumped whenever the generator's output changes, so an old corpus on disk is regenerated.
SAMPLE_CORPUS_VERSION = "1"
MANIFEST_NAME = "corpus.json"
_SUPERSAMPLE = 2

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 38, 38),
    "orange": (240, 130, 20),
    "yellow": (245, 210, 40),
    "green": (46, 150, 60),
    "teal": (20, 140, 140),
    "blue": (35, 75, 200),
    "purple": (120, 50, 160),
    "pink": (240, 120, 170),
    "brown": (120, 75, 40),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "grey": (130, 130, 130),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "hexagon", "cross")
SIZES = {"small": 0.075, "medium": 0.115, "large": 0.17}  # radius as a fraction of the side
PATTERN_BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "dots")
SCENE_BACKGROUNDS = ("meadow", "beach", "night", "sunset")
BACKGROUNDS = PATTERN_BACKGROUNDS + SCENE_BACKGROUNDS
VARIANTS = ("background", "palette", "layout", "texture", "count")
_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
_PLACES = {
    (0, 0): "in the top left corner",
    (1, 0): "at the top",
    (2, 0): "in the top right corner",
    (0, 1): "on the left",
    (1, 1): "in the middle",
    (2, 1): "on the right",
    (0, 2): "in the bottom left corner",
    (1, 2): "at the bottom",
    (2, 2): "in the bottom right corner",
}


@dataclass(frozen=True)
class Group:
    count: int
    size: str
    colour: str
    shape: str


@dataclass(frozen=True)
class Background:
    kind: str
    colour: str = "white"
    colour2: str = "grey"
    orientation: str = "horizontal"  # stripes/gradient direction
    scale: float = 0.12  # stripe/check/dot period as a fraction of the side


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    background: Background
    layout_seed: int
    template: int
    side: int


# ---------------------------------------------------------------------------------------------
# Scene sampling


def _pick_colours(rng: random.Random, k: int, avoid: set[str] = frozenset()) -> list[str]:
    return rng.sample([c for c in COLOURS if c not in avoid], k)


def _random_background(
    rng: random.Random, kind: str | None = None, avoid: set[str] = frozenset()
) -> Background:
    kind = kind or rng.choice(BACKGROUNDS)
    c1, c2 = _pick_colours(rng, 2, avoid)
    return Background(
        kind=kind,
        colour=c1,
        colour2=c2,
        orientation=rng.choice(("horizontal", "vertical", "diagonal")),
        scale=rng.choice((0.08, 0.12, 0.18)),
    )


def _background_colours(bg: Background) -> set[str]:
    if bg.kind == "plain":
        return {bg.colour}
    if bg.kind in PATTERN_BACKGROUNDS:
        return {bg.colour, bg.colour2}
    return {
        "meadow": {"green", "blue"},
        "beach": {"yellow", "blue"},
        "night": {"black"},
        "sunset": {"orange", "purple"},
    }[bg.kind]


def _random_groups(rng: random.Random, bg: Background) -> tuple[Group, ...]:
    n_groups = rng.choice((1, 1, 2, 2, 3))
    colours = _pick_colours(rng, n_groups, _background_colours(bg))
    shapes = rng.sample(SHAPES, n_groups)
    return tuple(
        Group(count=rng.choice((1, 1, 2, 3, 4)), size=rng.choice(tuple(SIZES)), colour=c, shape=s)
        for c, s in zip(colours, shapes)
    )


def _variant(rng: random.Random, base: Scene, kind: str) -> Scene:
    fresh = dict(layout_seed=rng.getrandbits(32), template=rng.randrange(len(_TEMPLATES)))
    if kind == "background":
        # Objects must stay visible: no background that shares their colours.
        objects = {g.colour for g in base.groups}
        kinds = [
            k
            for k in BACKGROUNDS
            if k != base.background.kind
            and (k in PATTERN_BACKGROUNDS or not objects & _background_colours(Background(k)))
        ]
        return replace(base, background=_random_background(rng, rng.choice(kinds), objects), **fresh)
    if kind == "palette":
        used = {g.shape for g in base.groups}
        shapes = rng.sample([s for s in SHAPES if s not in used], len(base.groups))
        groups = tuple(
            replace(g, shape=s, count=rng.choice((1, 2, 3))) for g, s in zip(base.groups, shapes)
        )
        return replace(base, groups=groups, **fresh)
    if kind == "layout":  # same content, other words: an identical caption would be a text duplicate
        others = [t for t in range(len(_TEMPLATES)) if t != base.template]
        return replace(base, layout_seed=fresh["layout_seed"], template=rng.choice(others))
    if kind == "texture":
        return replace(base, groups=_random_groups(rng, base.background), **fresh)
    if kind == "count":
        i = rng.randrange(len(base.groups))
        g = base.groups[i]
        count = g.count + 1 if g.count < 3 else g.count - 1
        groups = base.groups[:i] + (replace(g, count=count),) + base.groups[i + 1 :]
        return replace(base, groups=groups, layout_seed=rng.getrandbits(32))
    raise ValueError(kind)


def _plan(n: int, seed: int) -> list[tuple[Scene, int, str]]:
    """(scene, family id, variant) for every image, in file order."""
    rng = random.Random(f"megapairs-sample:{seed}")
    plan: list[tuple[Scene, int, str]] = []
    family = 0
    while len(plan) < n:
        bg = _random_background(rng)
        base = Scene(
            groups=_random_groups(rng, bg),
            background=bg,
            layout_seed=rng.getrandbits(32),
            template=rng.randrange(len(_TEMPLATES)),
            side=rng.choice((128, 144, 160, 176, 192)),
        )
        plan.append((base, family, "base"))
        for kind in rng.sample(VARIANTS, rng.randint(2, 4)):
            plan.append((_variant(rng, base, kind), family, kind))
        family += 1
    plan = plan[:n]
    # Spread families over the id range: neighbours should not be found just by adjacent ids.
    rng.shuffle(plan)
    return plan


# ---------------------------------------------------------------------------------------------
# Captions


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("ss", "x", "sh")) else "s")


def _group_phrase(g: Group) -> str:
    size = "" if g.size == "medium" and g.count > 1 else f"{g.size} "
    noun = g.shape if g.count == 1 else _plural(g.shape)
    return f"{_COUNT_WORDS[g.count]} {size}{g.colour} {noun}"


def object_phrase(groups: tuple[Group, ...]) -> str:
    parts = [_group_phrase(g) for g in groups]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background_phrase(bg: Background) -> str:
    direction = {"horizontal": "horizontal ", "vertical": "vertical ", "diagonal": "diagonal "}
    return {
        "plain": f"on a plain {bg.colour} background",
        "gradient": f"on a {bg.colour} to {bg.colour2} gradient background",
        "stripes": f"on a background of {direction[bg.orientation]}{bg.colour} and {bg.colour2} stripes",
        "checker": f"on a {bg.colour} and {bg.colour2} checkerboard",
        "dots": f"on a {bg.colour} background with {bg.colour2} polka dots",
        "meadow": "in a green meadow under a blue sky",
        "beach": "on a sandy beach by the sea",
        "night": "against a starry night sky",
        "sunset": "in front of an orange and purple sunset",
    }[bg.kind]


_TEMPLATES = (
    "{Objects} {bg}.",
    "A picture of {objects} {bg}.",
    "An illustration showing {objects} {bg}.",
    "{Objects}, drawn {bg}.",
    "A simple graphic: {objects} {bg}.",
)


def caption_for(scene: Scene, places: list[str]) -> str:
    objects = object_phrase(scene.groups)
    if len(places) == 1:  # a lone object: say where it is, as people do
        objects = f"{objects} {places[0]}"
    return _TEMPLATES[scene.template].format(
        objects=objects,
        Objects=objects[0].upper() + objects[1:],
        bg=_background_phrase(scene.background),
    )


# ---------------------------------------------------------------------------------------------
# Rendering


def _rgb(name: str) -> np.ndarray:
    return np.array(COLOURS[name], dtype=np.float32)


def _render_background(bg: Background, side: int, rng: np.random.Generator) -> Image.Image:
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    c1, c2 = _rgb(bg.colour), _rgb(bg.colour2)
    along = {"horizontal": y, "vertical": x, "diagonal": (x + y) / 2}[bg.orientation]

    def mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
        return a * (1 - t[..., None]) + b * t[..., None]

    if bg.kind == "plain":
        arr = np.broadcast_to(c1, (side, side, 3)).copy()
    elif bg.kind == "gradient":
        arr = mix(c1, c2, along)
    elif bg.kind == "stripes":
        arr = mix(c1, c2, (np.floor(along / (bg.scale / 2)) % 2))
    elif bg.kind == "checker":
        arr = mix(c1, c2, (np.floor(x / bg.scale) + np.floor(y / bg.scale)) % 2)
    elif bg.kind == "dots":
        fx, fy = (x / bg.scale) % 1 - 0.5, (y / bg.scale) % 1 - 0.5
        arr = mix(c1, c2, ((fx * fx + fy * fy) < 0.09).astype(np.float32))
    elif bg.kind == "meadow":
        sky = mix(np.array([150, 200, 250.0]), np.array([60, 120, 220.0]), 1 - y / 0.6)
        grass = np.array([60, 150, 50.0]) + rng.normal(0, 18, (side, side, 1)) * [0.5, 1, 0.4]
        arr = np.where((y < 0.6)[..., None], sky, grass)
    elif bg.kind == "beach":
        sky = mix(np.array([170, 215, 250.0]), np.array([110, 170, 235.0]), y / 0.35)
        sea = np.array([30, 100, 170.0]) + 25 * np.sin(x[..., None] * 60 + y[..., None] * 20)
        sand = np.array([225, 200, 140.0]) + rng.normal(0, 10, (side, side, 1))
        arr = np.where((y < 0.35)[..., None], sky, np.where((y < 0.62)[..., None], sea, sand))
    elif bg.kind == "night":
        arr = mix(np.array([10, 15, 45.0]), np.array([30, 35, 80.0]), y)
        stars = rng.random((side, side)) < 0.006
        arr[stars] = 240
    elif bg.kind == "sunset":
        sky = mix(np.array([250, 150, 40.0]), np.array([110, 40, 130.0]), 1 - y / 0.7)
        arr = np.where((y < 0.7)[..., None], sky, np.array([40, 25, 30.0]))
    else:
        raise ValueError(bg.kind)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif shape == "star":
        outer = _polygon(cx, cy, r, 5, -math.pi / 2)
        inner = _polygon(cx, cy, r * 0.42, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(shape)


def _layout(scene: Scene) -> list[tuple[Group, float, float, float]]:
    """(group, x, y, radius) in unit coordinates; objects kept mostly apart by rejection sampling."""
    rng = random.Random(scene.layout_seed)
    placed: list[tuple[Group, float, float, float]] = []
    for g in scene.groups:
        for _ in range(g.count):
            r = SIZES[g.size] * rng.uniform(0.85, 1.15)
            best = None
            for _ in range(30):
                x, y = rng.uniform(r + 0.02, 0.98 - r), rng.uniform(r + 0.02, 0.98 - r)
                gap = min((math.dist((x, y), (px, py)) - r - pr for _, px, py, pr in placed), default=1.0)
                if best is None or gap > best[0]:
                    best = (gap, x, y)
                if gap > 0.01:
                    break
            placed.append((g, best[1], best[2], r))
    return placed


def _place_word(objects: list[tuple[Group, float, float, float]]) -> list[str]:
    return [_PLACES[(min(int(x * 3), 2), min(int(y * 3), 2))] for _, x, y, _ in objects]


def render(scene: Scene, noise_seed: int | tuple[int, ...]) -> tuple[Image.Image, str]:
    big = scene.side * _SUPERSAMPLE
    # Only the shapes need supersampling for smooth edges; the background is drawn at final size.
    img = _render_background(scene.background, scene.side, np.random.default_rng(noise_seed))
    img = img.resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    objects = _layout(scene)
    for g, x, y, r in objects:
        _draw_shape(draw, g.shape, x * big, y * big, r * big, COLOURS[g.colour])
    img = img.resize((scene.side, scene.side), Image.Resampling.BOX)
    return img, caption_for(scene, _place_word(objects))


# ---------------------------------------------------------------------------------------------
# Writing


def _is_complete(root: Path, n: int, seed: int) -> dict[str, Any] | None:
    images = root / "images"
    try:
        manifest = read_json(root / MANIFEST_NAME)
        if (manifest["version"], manifest["n"], manifest["seed"]) != (SAMPLE_CORPUS_VERSION, n, seed):
            return None
        items = manifest["items"]
        files = [images / name for item in items for name in (item["file"], item["caption_file"])]
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged manifest: regenerate
        return None
    return manifest if len(items) == n and all(f.is_file() for f in files) else None


def generate_sample_corpus(out_dir: str | Path, n: int, seed: int) -> dict[str, Any]:
    """Write `n` captioned images to out_dir/images (00000.png + 00000.txt, ...) and corpus.json.

    Byte-identical for the same (n, seed). A complete corpus with the same (n, seed, version)
    already there is kept as is. Per-image family/variant records are in corpus.json; returns a
    summary: root, images_dir, n, seed, version, families, generated.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    root = Path(out_dir).expanduser().resolve()
    existing = _is_complete(root, n, seed)
    if existing is not None:
        return _summary(root, existing, generated=False)
    root.mkdir(parents=True, exist_ok=True)
    # The manifest is the completeness marker: drop it before touching images, write it last.
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    plan = _plan(n, seed)
    fmt_rng = random.Random(f"megapairs-sample-format:{seed}")
    names = [f"{i:05d}.{'jpg' if fmt_rng.random() < 0.4 else 'png'}" for i in range(n)]
    with atomic_dir(root / "images") as tmp:

        def write(i: int) -> None:
            # Every image has its own seeds, so the output does not depend on thread scheduling.
            img, caption = render(plan[i][0], noise_seed=(seed % 2**63, i))
            buf = io.BytesIO()
            if names[i].endswith(".jpg"):
                img.save(buf, "JPEG", quality=90)
            else:
                img.save(buf, "PNG", compress_level=6)
            (tmp / names[i]).write_bytes(buf.getvalue())
            (tmp / f"{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(write, range(n)))
    items = [
        {
            "file": names[i],
            "caption_file": f"{i:05d}.txt",
            "family": family,
            "variant": variant,
            "objects": object_phrase(scene.groups),
            "background": _background_phrase(scene.background),
        }
        for i, (scene, family, variant) in enumerate(plan)
    ]
    manifest = {"version": SAMPLE_CORPUS_VERSION, "n": n, "seed": seed, "items": items}
    write_json(manifest, root / MANIFEST_NAME)
    return _summary(root, manifest, generated=True)


def _summary(root: Path, manifest: dict[str, Any], generated: bool) -> dict[str, Any]:
    return {
        "root": str(root),
        "images_dir": str(root / "images"),
        "n": manifest["n"],
        "seed": manifest["seed"],
        "version": manifest["version"],
        "families": len({item["family"] for item in manifest["items"]}),
        "generated": generated,
    }
