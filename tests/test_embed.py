"""Embed stage: alignment of vectors and ids, quarantine of bad items, idempotence and resume."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from megapairs_ops import embed as embed_module
from megapairs_ops import media
from megapairs_ops.config import parse_config
from megapairs_ops.embed import embed_corpus
from megapairs_ops.encoders import build_encoder
from megapairs_ops.storage import RunLayout, write_parquet

COLOURS = [(205, 38, 38), (35, 75, 200), (46, 150, 60), (245, 210, 40), (120, 50, 160), (25, 25, 25)]


def _picture(i: int) -> Image.Image:
    img = Image.new("RGB", (96 + 8 * (i % 3), 96), COLOURS[i % len(COLOURS)])
    draw = ImageDraw.Draw(img)
    x = 10 + (i * 13) % 50
    draw.ellipse((x, 20, x + 30, 50), fill=COLOURS[(i + 2) % len(COLOURS)])
    return img


def make_run(tmp_path: Path, n_good: int = 10, broken: bool = True) -> tuple[RunLayout, dict[str, str]]:
    """images.parquet listing `n_good` real images plus (optionally) a truncated, a non-image and a
    missing file. Returns the layout and {path: expected quarantine reason}."""
    files = tmp_path / "files"
    files.mkdir(parents=True)
    rows, bad = [], {}
    for i in range(n_good):
        path = files / f"img{i:02d}.png"
        _picture(i).save(path)
        rows.append((path, f"Picture {i}: a coloured disc on a plain background number {i}."))
    if broken:
        whole = files / "whole.png"
        _picture(99).save(whole)
        truncated = files / "truncated.png"
        truncated.write_bytes(whole.read_bytes()[:200])
        whole.unlink()
        not_image = files / "notes.png"
        not_image.write_text("this is not a picture")
        missing = files / "missing.png"
        rows += [(truncated, "cut short"), (not_image, "text"), (missing, "gone")]
        bad = {
            str(truncated): {"truncated_image", "corrupt_image"},
            str(not_image): {"not_an_image"},
            str(missing): {"missing_file"},
        }
    table_rows = []
    for path, caption in rows:
        key = hashlib.sha256(path.read_bytes() if path.exists() else str(path).encode()).hexdigest()
        table_rows.append({"image_id": key[:16], "path": str(path), "caption": caption})
    table_rows.sort(key=lambda r: r["image_id"])
    layout = RunLayout(tmp_path / "run")
    write_parquet(pa.Table.from_pylist(table_rows), layout.images)
    return layout, bad


def config(*encoders: dict, batch_size: int = 4):
    return parse_config({"encoders": [{"batch_size": batch_size, **e} for e in encoders]})


COLOR = {"name": "color", "kind": "classic_color_layout", "dim": 64}
CAPTION = {"name": "caption", "kind": "classic_text_hash", "dim": 64}


def read_outputs(layout: RunLayout, name: str):
    vectors = np.load(layout.embedding_vectors(name))
    ids = pq.read_table(layout.embedding_ids(name)).column("image_id").to_pylist()
    quarantine = pq.read_table(layout.quarantine_part(f"embed-{name}")).to_pylist()
    return vectors, ids, quarantine


def only_final_outputs(layout: RunLayout, name: str) -> bool:
    """No parts or temp files are left next to the two published files."""
    return sorted(p.name for p in layout.embedding_dir(name).iterdir()) == ["ids.parquet", "vectors.npy"]


def test_rows_align_with_ids_and_bad_images_are_quarantined(tmp_path):
    layout, bad = make_run(tmp_path)
    cfg = config(COLOR)
    stats = embed_corpus(cfg, "color", layout, progress=True)
    vectors, ids, quarantine = read_outputs(layout, "color")

    assert stats == {
        "images_in": 13, "embedded": 10, "quarantined": 3, "dim": 64,
        "encoder_kind": "classic_color_layout", "model": None,
    }
    assert vectors.dtype == np.float32 and vectors.shape == (10, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    images = pq.read_table(layout.images).to_pylist()
    path_of = {r["image_id"]: r["path"] for r in images}
    good_order = [r["image_id"] for r in images if r["path"] not in bad]
    assert ids == good_order  # input order kept, bad rows dropped
    encoder = build_encoder(cfg.encoder("color"))
    for row, image_id in enumerate(ids):
        image = media.load_rgb(media.read_image_bytes(path_of[image_id]), cfg.ingest.max_pixels)
        np.testing.assert_array_equal(vectors[row], encoder.encode_images([image])[0])

    assert {q["path"] for q in quarantine} == set(bad)
    for q in quarantine:
        assert q["reason"] in bad[q["path"]]
        assert q["stage"] == "embed-color" and q["detail"]
    # Nothing but the two outputs is left in the embedding directory.
    assert only_final_outputs(layout, "color")


def test_rerun_gives_byte_identical_outputs(tmp_path):
    layout, _ = make_run(tmp_path)
    cfg = config(COLOR)
    embed_corpus(cfg, "color", layout)
    paths = [
        layout.embedding_vectors("color"),
        layout.embedding_ids("color"),
        layout.quarantine_part("embed-color"),
    ]
    before = [p.read_bytes() for p in paths]
    embed_corpus(cfg, "color", layout)
    assert [p.read_bytes() for p in paths] == before


def test_text_view_embeds_captions_and_quarantines_empty_ones(tmp_path):
    layout, _ = make_run(tmp_path, n_good=4, broken=False)
    table = pq.read_table(layout.images).to_pylist()
    table[1]["caption"] = "  "
    write_parquet(pa.Table.from_pylist(table), layout.images)
    stats = embed_corpus(config(CAPTION), "caption", layout)
    vectors, ids, quarantine = read_outputs(layout, "caption")
    assert stats["embedded"] == 3 and stats["quarantined"] == 1
    assert ids == [r["image_id"] for i, r in enumerate(table) if i != 1]
    assert [(q["path"], q["reason"]) for q in quarantine] == [(table[1]["path"], "empty_caption")]
    encoder = build_encoder(config(CAPTION).encoder("caption"))
    kept = [r["caption"] for i, r in enumerate(table) if i != 1]
    np.testing.assert_array_equal(vectors, encoder.encode_texts(kept))


def test_clean_corpus_still_writes_an_empty_quarantine_part(tmp_path):
    layout, _ = make_run(tmp_path, n_good=3, broken=False)
    stats = embed_corpus(config(COLOR), "color", layout)
    assert stats["quarantined"] == 0
    assert pq.read_table(layout.quarantine_part("embed-color")).num_rows == 0


def test_empty_corpus(tmp_path):
    layout = RunLayout(tmp_path / "run")
    write_parquet(pa.table({"image_id": pa.array([], pa.string()), "path": pa.array([], pa.string()),
                            "caption": pa.array([], pa.string())}), layout.images)
    stats = embed_corpus(config(COLOR), "color", layout)
    vectors, ids, quarantine = read_outputs(layout, "color")
    assert stats["embedded"] == 0 and vectors.shape == (0, 64) and ids == [] and quarantine == []


def test_missing_images_table_names_the_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="ingest"):
        embed_corpus(config(COLOR), "color", RunLayout(tmp_path / "run"))


def test_model_backed_encoders_run_through_the_stage(tmp_path, tiny_clip_dir, tiny_dinov2_dir):
    layout, bad = make_run(tmp_path, n_good=5)
    cfg = config(
        {"name": "clip", "kind": "clip_image", "model": str(tiny_clip_dir)},
        {"name": "clip-text", "kind": "clip_text", "model": str(tiny_clip_dir)},
        {"name": "dino", "kind": "dinov2", "model": str(tiny_dinov2_dir)},
    )
    for name, dim, quarantined in (("clip", 16, 3), ("clip-text", 16, 0), ("dino", 24, 3)):
        stats = embed_corpus(cfg, name, layout)
        vectors, ids, quarantine = read_outputs(layout, name)
        model = str(tiny_dinov2_dir if name == "dino" else tiny_clip_dir)
        assert (stats["dim"], stats["quarantined"], stats["model"]) == (dim, quarantined, model)
        assert vectors.shape == (len(ids), dim) and len(ids) == 8 - quarantined
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


class _Flaky:
    """Wraps a real encoder: counts encoded items, and can fail on a given call or emit NaN rows."""

    def __init__(self, inner, fail_on_call: int | None = None, nan_for: set[int] = frozenset()):
        self.inner, self.fail_on_call, self.nan_for = inner, fail_on_call, nan_for
        self.calls = 0
        self.items = 0
        self.name, self.modality, self.dim = inner.name, inner.modality, inner.dim
        self.identity = inner.identity

    def prepare_image(self, image):
        return self.inner.prepare_image(image)

    def prepare_text(self, text):
        return self.inner.prepare_text(text)

    def encode_prepared(self, items):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("worker killed")
        out = self.inner.encode_prepared(items)
        for row in range(len(items)):
            if self.items + row in self.nan_for:
                out[row] = np.nan
        self.items += len(items)
        return out


def test_killed_run_resumes_at_the_first_unfinished_chunk(tmp_path, monkeypatch):
    layout, bad = make_run(tmp_path, n_good=12)
    cfg = config(COLOR, batch_size=2)
    real_build = embed_module.build_encoder

    reference = RunLayout(tmp_path / "reference")
    reference.images.parent.mkdir(parents=True)
    reference.images.write_bytes(layout.images.read_bytes())
    embed_corpus(cfg, "color", reference, chunk_rows=4)
    expected = read_outputs(reference, "color")

    first = {}
    monkeypatch.setattr(
        embed_module, "build_encoder", lambda enc: first.setdefault("e", _Flaky(real_build(enc), fail_on_call=4))
    )
    with pytest.raises(RuntimeError, match="worker killed"):
        embed_corpus(cfg, "color", layout, chunk_rows=4)
    assert not layout.embedding_vectors("color").exists()

    second = {}
    monkeypatch.setattr(
        embed_module, "build_encoder", lambda enc: second.setdefault("e", _Flaky(real_build(enc)))
    )
    embed_corpus(cfg, "color", layout, chunk_rows=4)
    # The kill hit chunk 1; chunk 0 (rows 0-3) was saved and is not encoded again.
    first_chunk = pq.read_table(layout.images).column("path").to_pylist()[:4]
    good_in_chunk0 = sum(p not in bad for p in first_chunk)
    assert first["e"].items >= good_in_chunk0
    assert second["e"].items == 12 - good_in_chunk0
    got = read_outputs(layout, "color")
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1:] == expected[1:]
    assert only_final_outputs(layout, "color")


def test_non_finite_vectors_are_quarantined_not_published(tmp_path, monkeypatch):
    layout, _ = make_run(tmp_path, n_good=5, broken=False)
    real_build = embed_module.build_encoder
    monkeypatch.setattr(embed_module, "build_encoder", lambda enc: _Flaky(real_build(enc), nan_for={2}))
    stats = embed_corpus(config(COLOR), "color", layout)
    vectors, ids, quarantine = read_outputs(layout, "color")
    assert stats["embedded"] == 4 and np.isfinite(vectors).all()
    assert [q["reason"] for q in quarantine] == ["non_finite_embedding"]
    assert quarantine[0]["path"] == pq.read_table(layout.images).column("path")[2].as_py()
