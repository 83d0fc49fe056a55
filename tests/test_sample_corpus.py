import hashlib
import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from megapairs_ops.sample_corpus import SAMPLE_CORPUS_VERSION, generate_sample_corpus
from tests.fixtures.corpus import SAMPLE_N, SAMPLE_SEED


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def manifest(root: Path) -> dict:
    return json.loads((root / "corpus.json").read_text())


def grid(path: Path) -> np.ndarray:
    """A coarse colour layout: what a colour-layout encoder compares."""
    return np.asarray(Image.open(path).convert("RGB").resize((8, 8), Image.Resampling.BOX), np.float32)


def test_same_n_and_seed_give_byte_identical_corpora(tmp_path, sample_corpus):
    again = generate_sample_corpus(tmp_path / "again", n=SAMPLE_N, seed=SAMPLE_SEED)
    assert again["generated"] is True
    assert digest_tree(tmp_path / "again") == digest_tree(sample_corpus)
    other = generate_sample_corpus(tmp_path / "other", n=SAMPLE_N, seed=SAMPLE_SEED + 1)
    assert other["generated"] is True
    assert digest_tree(tmp_path / "other") != digest_tree(sample_corpus)


def test_layout_files_and_captions(sample_corpus):
    images = sample_corpus / "images"
    info = manifest(sample_corpus)
    assert (info["n"], info["seed"], info["version"]) == (SAMPLE_N, SAMPLE_SEED, SAMPLE_CORPUS_VERSION)
    assert len(info["items"]) == SAMPLE_N
    suffixes = set()
    for i, item in enumerate(info["items"]):
        assert item["file"].startswith(f"{i:05d}.")
        suffixes.add(Path(item["file"]).suffix)
        with Image.open(images / item["file"]) as img:
            img.load()
            assert img.mode == "RGB" and 128 <= img.width <= 192 and img.width == img.height
        caption = (images / item["caption_file"]).read_text(encoding="utf-8").strip()
        assert caption and caption[0].isupper() and caption.endswith(".")
        assert item["objects"].lower() in caption.lower()
        assert item["background"] in caption
    assert suffixes == {".png", ".jpg"}
    assert sorted(p.name for p in images.iterdir()) == sorted(
        [i["file"] for i in info["items"]] + [i["caption_file"] for i in info["items"]]
    )


def test_existing_complete_corpus_is_kept_and_damaged_one_regenerated(tmp_path):
    root = tmp_path / "c"
    assert generate_sample_corpus(root, n=12, seed=3)["generated"] is True
    before = digest_tree(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_sample_corpus(root, n=12, seed=3)["generated"] is False
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes

    (root / "images" / "00004.txt").unlink()
    assert generate_sample_corpus(root, n=12, seed=3)["generated"] is True
    assert digest_tree(root) == before

    assert generate_sample_corpus(root, n=8, seed=3)["generated"] is True
    assert len(manifest(root)["items"]) == 8
    assert len(list((root / "images").glob("*.txt"))) == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_related_images_exist_along_several_axes(sample_corpus):
    items = manifest(sample_corpus)["items"]
    images = sample_corpus / "images"
    captions = {i["file"]: (images / i["caption_file"]).read_text().strip() for i in items}
    families = defaultdict(dict)
    for item in items:
        families[item["family"]][item["variant"]] = item
    variants = {v for fam in families.values() for v in fam}
    assert variants == {"base", "background", "palette", "layout", "texture", "count"}

    # Caption axis: same objects, other words or other background; the object phrase is shared.
    text_pairs = [
        (fam["base"], fam[v]) for fam in families.values() for v in ("layout", "background") if v in fam
    ]
    assert len(text_pairs) >= 10
    for base, other in text_pairs:
        assert base["objects"].lower() in captions[other["file"]].lower()
        assert captions[base["file"]] != captions[other["file"]]

    # Texture/palette axis: same background, other objects.
    same_background = [(f["base"], f["texture"]) for f in families.values() if "texture" in f]
    assert same_background and all(a["background"] == b["background"] for a, b in same_background)
    assert all(a["objects"] != b["objects"] for a, b in same_background)

    # Colour-layout axis: family members look closer than unrelated images do.
    def dist(a: dict, b: dict) -> float:
        return float(np.abs(grid(images / a["file"]) - grid(images / b["file"])).mean())

    related = [dist(f["base"], f[v]) for f in families.values() for v in ("layout", "count", "texture") if v in f]
    bases = [f["base"] for f in families.values()]
    unrelated = [dist(a, b) for a, b in combinations(bases, 2)]
    assert np.mean(related) < 0.5 * np.mean(unrelated)
