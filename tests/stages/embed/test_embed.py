"""Embed stage: alignment of vectors and ids, quarantine of bad items, shards and resume after a kill,
the content-addressed cache, shared decode, CUDA out-of-memory backoff, work items for Airflow and
precomputed (clip-retrieval) input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from megapairs_ops import media
from megapairs_ops.config import ConfigError, parse_config
from megapairs_ops.errors import ItemsNotDone
from megapairs_ops.layout import RunLayout
from megapairs_ops.stages.embed import embed_corpus, embed_corpus_multi, run_embed_work
from megapairs_ops.stages.embed import shards as embed_module
from megapairs_ops.stages.embed.encoders import EncodeInputError, build_encoder
from megapairs_ops.stages.embed.finalize import finalize_embed
from megapairs_ops.stages.embed.plan import plan_embed_work
from megapairs_ops.stages.embed.shards import cache_root
from megapairs_ops.storage import write_parquet
from tests.fixtures.paths import REPO

COLOURS = [(205, 38, 38), (35, 75, 200), (46, 150, 60), (245, 210, 40), (120, 50, 160), (25, 25, 25)]


def _picture(i: int) -> Image.Image:
    img = Image.new("RGB", (96 + 8 * (i % 3), 96), COLOURS[i % len(COLOURS)])
    draw = ImageDraw.Draw(img)
    x = 10 + (i * 13) % 50
    draw.ellipse((x, 20, x + 30, 50), fill=COLOURS[(i + 2) % len(COLOURS)])
    draw.rectangle((5, 60 + i % 20, 25 + i, 80 + i % 13), fill=COLOURS[(i + 4) % len(COLOURS)])
    return img


def write_images_table(rows: list[dict], layout: RunLayout) -> None:
    for row in rows:
        path = Path(row["path"])
        # A missing file's id comes from its name, not its (temporary) folder: the row order, and
        # so each shard's rows, must not change between test sessions.
        digest = hashlib.sha256(path.read_bytes() if path.exists() else path.name.encode()).hexdigest()
        row.update(image_id=digest[:16], sha256=digest)
    rows.sort(key=lambda r: r["image_id"])
    write_parquet(pa.Table.from_pylist(rows), layout.images)


def make_run(
    tmp_path: Path, n_good: int = 10, broken: bool = True, run: str = "run", first: int = 0
) -> tuple[RunLayout, dict[str, set[str]]]:
    """images.parquet listing `n_good` real images (pictures first..first+n_good-1) plus (optionally)
    a truncated, a non-image and a missing file. Returns the layout and {path: allowed reasons}."""
    files = tmp_path / "files"
    files.mkdir(parents=True, exist_ok=True)
    rows, bad = [], {}
    for i in range(first, first + n_good):
        path = files / f"img{i:03d}.png"
        _picture(i).save(path)
        rows.append({"path": str(path), "caption": f"Picture {i}: a coloured disc on a plain background number {i}."})
    if broken:
        whole = files / "whole.png"
        _picture(99).save(whole)
        truncated = files / "truncated.png"
        truncated.write_bytes(whole.read_bytes()[:200])
        whole.unlink()
        not_image = files / "notes.png"
        not_image.write_text("this is not a picture")
        missing = files / "missing.png"
        rows += [{"path": str(truncated), "caption": "cut short"}, {"path": str(not_image), "caption": "text"},
                 {"path": str(missing), "caption": "gone"}]
        bad = {
            str(truncated): {"truncated_image", "corrupt_image"},
            str(not_image): {"not_an_image"},
            str(missing): {"missing_file"},
        }
    layout = RunLayout(tmp_path / run)
    write_images_table(rows, layout)
    return layout, bad


def same_corpus(layout: RunLayout, root: Path) -> RunLayout:
    """Another run directory over the very same images.parquet (same files, same shards)."""
    other = RunLayout(root)
    other.images.parent.mkdir(parents=True)
    other.images.write_bytes(layout.images.read_bytes())
    return other


def config(*encoders: dict, batch_size: int = 4, **embed):
    return parse_config(
        {"embed": embed, "encoders": [{"batch_size": batch_size, **e} for e in encoders]}
    )


COLOR = {"name": "color", "kind": "classic_color_layout", "dim": 64}
TEXTURE = {"name": "texture", "kind": "classic_texture", "dim": 32}
CAPTION = {"name": "caption", "kind": "classic_text_hash", "dim": 64}


def read_outputs(layout: RunLayout, name: str):
    vectors = np.load(layout.embedding_vectors(name))
    ids = pq.read_table(layout.embedding_ids(name)).column("image_id").to_pylist()
    quarantine = pq.read_table(layout.quarantine_part(f"embed-{name}")).to_pylist()
    return vectors, ids, quarantine


def assert_same_outputs(a, b, exact: bool = True) -> None:
    """Same vectors, ids and quarantine (files compared by name: runs may live in other folders)."""
    if exact:
        np.testing.assert_array_equal(a[0], b[0])
    else:
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert a[1] == b[1]
    # (A missing file's image_id hashes its path, so its place in the corpus differs per folder.)
    named = [sorted((Path(q["path"]).name, q["reason"], q["stage"]) for q in out[2]) for out in (a, b)]
    assert named[0] == named[1]


def only_final_outputs(layout: RunLayout, name: str) -> bool:
    """No shards or temp files are left next to the two published files."""
    return sorted(p.name for p in layout.embedding_dir(name).iterdir()) == ["ids.parquet", "vectors.npy"]


def test_rows_align_with_ids_and_bad_images_are_quarantined(tmp_path):
    layout, bad = make_run(tmp_path)
    cfg = config(COLOR, shard_size=4)
    stats = embed_corpus(cfg, "color", layout, progress=True)
    vectors, ids, quarantine = read_outputs(layout, "color")

    identity = stats.pop("identity")
    assert stats == {
        "images_in": 13, "embedded": 10, "quarantined": 3, "dim": 64, "encoder_kind": "classic_color_layout",
        "model": None, "reused": 0, "computed": 10, "shards": 4,
    }
    assert (cache_root(cfg, layout) / identity / "identity.json").is_file()
    assert vectors.dtype == np.float32 and vectors.shape == (10, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    images = pq.read_table(layout.images).to_pylist()
    path_of = {r["image_id"]: r["path"] for r in images}
    assert ids == [r["image_id"] for r in images if r["path"] not in bad]  # input order kept, bad rows dropped
    encoder = build_encoder(cfg.encoder("color"))
    for row, image_id in enumerate(ids):
        image = media.load_rgb(media.read_image_bytes(path_of[image_id]), cfg.ingest.max_pixels)
        np.testing.assert_array_equal(vectors[row], encoder.encode_images([image])[0])
    assert {q["path"] for q in quarantine} == set(bad)
    for q in quarantine:
        assert q["reason"] in bad[q["path"]]
        assert q["stage"] == "embed-color" and q["detail"]
    assert only_final_outputs(layout, "color")


def test_rerun_gives_byte_identical_outputs_from_the_cache(tmp_path):
    layout, _ = make_run(tmp_path)
    cfg = config(COLOR)
    first = embed_corpus(cfg, "color", layout)
    paths = [layout.embedding_vectors("color"), layout.embedding_ids("color"), layout.quarantine_part("embed-color")]
    before = [p.read_bytes() for p in paths]
    again = embed_corpus(cfg, "color", layout)
    assert [p.read_bytes() for p in paths] == before
    assert (first["computed"], first["reused"]) == (10, 0)
    assert (again["computed"], again["reused"]) == (0, 10)


def test_text_view_embeds_captions_and_quarantines_empty_ones(tmp_path):
    layout, _ = make_run(tmp_path, n_good=4, broken=False)
    table = pq.read_table(layout.images).to_pylist()
    table[1]["caption"] = "  "
    table[2]["caption"] = None
    write_parquet(pa.Table.from_pylist(table), layout.images)
    stats = embed_corpus(config(CAPTION), "caption", layout)
    vectors, ids, quarantine = read_outputs(layout, "caption")
    assert stats["embedded"] == 2 and stats["quarantined"] == 2
    assert ids == [r["image_id"] for i, r in enumerate(table) if i not in (1, 2)]
    assert [(q["path"], q["reason"]) for q in quarantine] == [
        (table[1]["path"], "empty_caption"), (table[2]["path"], "empty_caption")
    ]
    encoder = build_encoder(config(CAPTION).encoder("caption"))
    np.testing.assert_array_equal(vectors, encoder.encode_texts([table[0]["caption"], table[3]["caption"]]))


def test_clean_corpus_still_writes_an_empty_quarantine_part(tmp_path):
    layout, _ = make_run(tmp_path, n_good=3, broken=False)
    stats = embed_corpus(config(COLOR), "color", layout)
    assert stats["quarantined"] == 0
    assert pq.read_table(layout.quarantine_part("embed-color")).num_rows == 0


def test_empty_corpus(tmp_path):
    layout = RunLayout(tmp_path / "run")
    empty = {c: pa.array([], pa.string()) for c in ("image_id", "sha256", "path", "caption")}
    write_parquet(pa.table(empty), layout.images)
    assert plan_embed_work(config(COLOR), layout) == []
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
        encoder = build_encoder(cfg.encoder(name))
        if name != "clip-text":
            path_of = {r["image_id"]: r["path"] for r in pq.read_table(layout.images).to_pylist()}
            images = [media.load_rgb(media.read_image_bytes(path_of[i]), 10**8) for i in ids]
            np.testing.assert_allclose(vectors, encoder.encode_images(images), atol=1e-5)


@pytest.mark.open_clip
def test_open_clip_encoders_run_through_the_stage(tmp_path, tiny_open_clip_dir):
    """open_clip image and text kinds through the sharded stage (shared decode, shards of 3),
    with the vectors open_clip's own transform and model give."""
    import open_clip
    import torch

    layout, _ = make_run(tmp_path, n_good=5)
    cfg = config(
        {"name": "eva", "kind": "open_clip_image", "model": str(tiny_open_clip_dir)},
        {"name": "eva-text", "kind": "open_clip_text", "model": f"local-dir:{tiny_open_clip_dir}"},
        shard_size=3,
    )
    stats = embed_corpus_multi(cfg, ["eva", "eva-text"], layout)
    assert (stats["eva"]["dim"], stats["eva"]["quarantined"]) == (16, 3)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip_dir}")
    rows = {r["image_id"]: r for r in pq.read_table(layout.images).to_pylist()}
    vectors, ids, _ = read_outputs(layout, "eva")
    images = [media.load_rgb(media.read_image_bytes(rows[i]["path"]), 10**8) for i in ids]
    with torch.inference_mode():
        reference = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True).numpy()
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    text_vectors, text_ids, _ = read_outputs(layout, "eva-text")
    with torch.inference_mode():
        text_reference = model.encode_text(tokenizer([rows[i]["caption"] for i in text_ids]), normalize=True).numpy()
    np.testing.assert_allclose(text_vectors, text_reference, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shared decode and decode workers


def test_image_encoders_share_one_decode_and_match_separate_runs(tmp_path, monkeypatch, tiny_clip_dir):
    layout, bad = make_run(tmp_path, n_good=9)
    encoders = (COLOR, TEXTURE, {"name": "clip", "kind": "clip_image", "model": str(tiny_clip_dir)})
    separate = {}
    for enc in encoders:
        cfg = config(enc, cache=False, share_decode=False)
        embed_corpus(cfg, enc["name"], layout)
        separate[enc["name"]] = read_outputs(layout, enc["name"])

    decodes = []
    real = media.load_rgb
    monkeypatch.setattr(media, "load_rgb", lambda data, max_pixels: decodes.append(1) or real(data, max_pixels))
    cfg = config(*encoders, cache=False, shard_size=5)
    stats = embed_corpus_multi(cfg, ["color", "texture", "clip"], layout)
    # color and texture (both CPU kinds) share a task; clip (GPU-preferred) runs in its own group.
    assert len(decodes) == 2 * 11  # every readable file decoded once per group, not once per encoder
    for name, outputs in separate.items():
        assert stats[name]["embedded"] == 9
        assert_same_outputs(read_outputs(layout, name), outputs, exact=name != "clip")


def test_decode_worker_processes_give_the_in_process_result(tmp_path, tiny_clip_dir, tiny_dinov2_dir):
    layout, _ = make_run(tmp_path, n_good=9)
    encs = ({"name": "clip", "kind": "clip_image", "model": str(tiny_clip_dir)},
            {"name": "dino", "kind": "dinov2", "model": str(tiny_dinov2_dir), "batch_size": 3})
    outputs = {}
    for workers in (0, 2):
        cfg = config(*encs, cache=False, shard_size=4, decode_workers=workers, prefetch_batches=1)
        embed_corpus_multi(cfg, ["clip", "dino"], layout)
        outputs[workers] = {name: read_outputs(layout, name) for name in ("clip", "dino")}
    for name in ("clip", "dino"):
        assert_same_outputs(outputs[2][name], outputs[0][name])
        assert {q["reason"] for q in outputs[2][name][2]} >= {"not_an_image", "missing_file"}


# ---------------------------------------------------------------------------------------------
# Shards: resume after a kill


def test_killed_subprocess_resumes_at_the_first_unfinished_shard(tmp_path, tiny_clip_dir):
    """A real process (with a decode worker process) is SIGKILLed after committing 3 shards, in
    the middle of a window of 2; a new one finishes the stage with the exact vectors of an
    uninterrupted run and does not redo the committed shards."""
    data = {
        "embed": {"shard_size": 3, "shards_per_task": 2, "decode_workers": 1, "cache": False},
        "encoders": [{"name": "clip", "kind": "clip_image", "model": str(tiny_clip_dir), "batch_size": 2},
                     {**COLOR, "batch_size": 2}],
    }
    cfg = parse_config(data)
    layout, bad = make_run(tmp_path, n_good=12)
    reference = same_corpus(layout, tmp_path / "reference")
    embed_corpus_multi(cfg, ["clip", "color"], reference)
    script = textwrap.dedent(f"""
        import json
        from megapairs_ops.config import parse_config
        import os, signal
        from megapairs_ops.stages.embed import embed_corpus_multi
        from megapairs_ops.layout import RunLayout
        from megapairs_ops.storage import WorkDir
        commit = WorkDir.commit
        def commit_then_die(self, item_id, stats):  # the kill lands right after the 3rd commit of clip
            commit(self, item_id, stats)
            if self.root.name == "embed-clip" and len(list((self.root / "items").glob("*.json"))) >= 3:
                os.kill(os.getpid(), signal.SIGKILL)
        WorkDir.commit = commit_then_die
        embed_corpus_multi(parse_config(json.loads({json.dumps(json.dumps(data))})), ["clip", "color"],
                           RunLayout({str(layout.root)!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not layout.embedding_vectors("clip").exists()
    committed = sorted(p.name for p in (layout.work_dir("embed-clip") / "items").glob("*.json"))
    assert committed == ["shard-000000.json", "shard-000001.json", "shard-000002.json"]

    items = plan_embed_work(cfg, layout)
    done = [run_embed_work(cfg, layout, [item]) for item in items]
    clip_runs = [d["encoders"]["clip"] for d in done if "clip" in d["encoders"]]
    assert sum(r["shards_skipped"] for r in clip_runs) == 3  # the committed shards are not redone
    later_paths = pq.read_table(layout.images).column("path").to_pylist()[9:]
    assert sum(r["computed"] for r in clip_runs) == sum(p not in bad for p in later_paths)
    for name in ("clip", "color"):
        finalize_embed(cfg, layout, name)
        assert_same_outputs(read_outputs(layout, name), read_outputs(reference, name))
        assert only_final_outputs(layout, name)


class _Flaky:
    """Wraps a real encoder: counts encoded items, and can fail on a given call or emit NaN rows."""

    def __init__(self, inner, fail_on_call: int | None = None, nan_for: set[int] = frozenset()):
        self.inner, self.fail_on_call, self.nan_for = inner, fail_on_call, nan_for
        self.calls = 0
        self.items = 0
        self.name, self.modality, self.dim = inner.name, inner.modality, inner.dim
        self.identity = inner.identity

    def image_preprocessor(self):
        return self.inner.image_preprocessor()

    def prepare_text(self, text):
        return self.inner.prepare_text(text)

    def encode_batch(self, batch):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("worker killed")
        out = self.inner.encode_batch(batch)
        for row in range(len(batch)):
            if self.items + row in self.nan_for:
                out[row] = np.nan
        self.items += len(batch)
        return out


def test_failed_task_resumes_at_the_first_unfinished_shard(tmp_path, monkeypatch):
    layout, bad = make_run(tmp_path, n_good=12)
    cfg = config(COLOR, batch_size=2, shard_size=4, cache=False)
    real_build = embed_module.build_encoder
    reference = same_corpus(layout, tmp_path / "reference")
    embed_corpus(cfg, "color", reference)

    first = {}
    monkeypatch.setattr(embed_module, "build_encoder", lambda e: first.setdefault("e", _Flaky(real_build(e), fail_on_call=4)))
    with pytest.raises(RuntimeError, match="worker killed"):
        embed_corpus(cfg, "color", layout)
    assert not layout.embedding_vectors("color").exists()
    committed = [json.loads(p.read_text()) for p in (layout.work_dir("embed-color") / "items").glob("*.json")]
    assert committed and first["e"].items > sum(c["embedded"] for c in committed)  # killed mid-shard

    second = {}
    monkeypatch.setattr(embed_module, "build_encoder", lambda e: second.setdefault("e", _Flaky(real_build(e))))
    embed_corpus(cfg, "color", layout)
    # Committed shards are not encoded again; the one the failure hit is redone from its start.
    assert second["e"].items == 12 - sum(c["embedded"] for c in committed)
    assert_same_outputs(read_outputs(layout, "color"), read_outputs(reference, "color"))
    assert only_final_outputs(layout, "color")


def test_changed_config_redoes_committed_shards(tmp_path):
    layout, _ = make_run(tmp_path, n_good=6, broken=False)
    items = plan_embed_work(config(COLOR, shard_size=2, cache=False), layout)
    run_embed_work(config(COLOR, shard_size=2, cache=False), layout, items[:1])
    other = config({**COLOR, "dim": 48}, shard_size=2, cache=False)
    stats = embed_corpus(other, "color", layout)
    assert stats["dim"] == 48 and stats["computed"] == 6


def test_non_finite_vectors_are_quarantined_not_published(tmp_path, monkeypatch):
    layout, _ = make_run(tmp_path, n_good=5, broken=False)
    real_build = embed_module.build_encoder
    monkeypatch.setattr(embed_module, "build_encoder", lambda enc: _Flaky(real_build(enc), nan_for={2}))
    stats = embed_corpus(config(COLOR), "color", layout)
    vectors, ids, quarantine = read_outputs(layout, "color")
    assert stats["embedded"] == 4 and np.isfinite(vectors).all()
    assert [q["reason"] for q in quarantine] == ["non_finite_embedding"]
    assert quarantine[0]["path"] == pq.read_table(layout.images).column("path")[2].as_py()
    # Nothing non-finite reaches the cache either.
    assert embed_corpus(config(COLOR), "color", layout)["reused"] == 4


# ---------------------------------------------------------------------------------------------
# Failure handling: preprocessing, CUDA out of memory


class _PickyPreprocessor:
    """Fails on some images the way a real preprocessor can: expected or not."""

    def __init__(self, inner, fail_width: int | None, unexpected: bool = False):
        self.inner, self.fail_width, self.unexpected = inner, fail_width, unexpected

    def __call__(self, image):
        if self.fail_width is None or image.width == self.fail_width:
            if self.unexpected:
                raise ZeroDivisionError("odd image")
            raise EncodeInputError("too_small_for_model", f"width {image.width}")
        return self.inner(image)

    def collate(self, items):
        return self.inner.collate(items)


def test_images_failing_preprocessing_are_quarantined_with_the_reason(tmp_path, monkeypatch):
    layout, _ = make_run(tmp_path, n_good=9, broken=False)
    real_build = embed_module.build_encoder

    def picky(enc, **kw):
        encoder = _Flaky(real_build(enc))
        preprocessor = _PickyPreprocessor(encoder.inner.image_preprocessor(), **kw)
        encoder.image_preprocessor = lambda: preprocessor
        return encoder

    monkeypatch.setattr(embed_module, "build_encoder", lambda enc: picky(enc, fail_width=104))
    stats = embed_corpus(config(COLOR, cache=False), "color", layout)
    reasons = {q["reason"] for q in read_outputs(layout, "color")[2]}
    assert stats["quarantined"] == 3 and reasons == {"too_small_for_model"}  # pictures 1, 4, 7 are 104 wide

    monkeypatch.setattr(embed_module, "build_encoder", lambda enc: picky(enc, fail_width=104, unexpected=True))
    embed_corpus(config(COLOR, cache=False), "color", layout)
    assert {(q["reason"], q["detail"]) for q in read_outputs(layout, "color")[2]} == {
        ("preprocess_failed", "ZeroDivisionError: odd image")
    }
    # Every item of a batch failing unexpectedly is a broken encoder: the task fails.
    monkeypatch.setattr(embed_module, "build_encoder", lambda enc: picky(enc, fail_width=None, unexpected=True))
    with pytest.raises(RuntimeError, match="every item of a batch failed to preprocess"):
        embed_corpus(config(COLOR, batch_size=8, cache=False), "color", layout)


class _SmallGpu(_Flaky):
    """Raises CUDA's out-of-memory error for forward batches larger than `fits`."""

    def __init__(self, inner, fits: int):
        super().__init__(inner)
        self.fits, self.sizes = fits, []

    def encode_batch(self, batch):
        import torch

        self.sizes.append(len(batch))
        if len(batch) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().encode_batch(batch)


def test_cuda_out_of_memory_halves_the_batch_and_retries(tmp_path, monkeypatch, caplog):
    layout, _ = make_run(tmp_path, n_good=10, broken=False)
    embed_corpus(config(COLOR, batch_size=8, cache=False), "color", layout)
    expected = read_outputs(layout, "color")

    real_build = embed_module.build_encoder
    gpu = {}
    monkeypatch.setattr(embed_module, "build_encoder", lambda enc: gpu.setdefault("e", _SmallGpu(real_build(enc), fits=3)))
    with caplog.at_level("WARNING", logger="megapairs.embed"):
        embed_corpus(config(COLOR, batch_size=8, cache=False), "color", layout)
    assert_same_outputs(read_outputs(layout, "color"), expected)
    assert gpu["e"].sizes[:3] == [8, 4, 2]  # halved until it fits, then kept at the size that fits
    assert max(gpu["e"].sizes[3:]) == 2
    assert "out of memory at batch 8; retrying at 4" in caplog.text

    monkeypatch.setattr(embed_module, "build_encoder", lambda enc: _SmallGpu(real_build(enc), fits=0))
    with pytest.raises(RuntimeError, match="out of memory even at batch size 1"):
        embed_corpus(config(COLOR, batch_size=8, cache=False), "color", layout)


# ---------------------------------------------------------------------------------------------
# Cache


def _folder_corpus(root: Path, pictures: range) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in pictures:
        _picture(i).save(root / f"p{i:03d}.png")
        (root / f"p{i:03d}.txt").write_text(f"Picture {i}: shapes number {i} on a plain background.")
    return root


def test_grown_corpus_embeds_only_the_new_images(tmp_path, tiny_clip_dir):
    """Second run (a new run directory under the same output root) over the corpus plus 10% new
    images: the cache serves the old images, only the new ones go through the model."""
    from megapairs_ops.stages.ingest import ingest_corpus

    cfg = config({"name": "clip", "kind": "clip_image", "model": str(tiny_clip_dir)}, CAPTION, shard_size=7)
    corpus = _folder_corpus(tmp_path / "corpus", range(20))
    first = RunLayout(tmp_path / "runs" / "first")
    ingest_corpus(cfg, corpus, first)
    before = embed_corpus_multi(cfg, ["clip", "caption"], first)
    assert {n: (s["computed"], s["reused"]) for n, s in before.items()} == {"clip": (20, 0), "caption": (20, 0)}

    _folder_corpus(corpus, range(20, 22))
    second = RunLayout(tmp_path / "runs" / "second")
    ingest_corpus(cfg, corpus, second)
    after = embed_corpus_multi(cfg, ["clip", "caption"], second)
    assert {n: (s["computed"], s["reused"]) for n, s in after.items()} == {"clip": (2, 20), "caption": (2, 20)}
    for name in ("clip", "caption"):
        old_vectors, old_ids, _ = read_outputs(first, name)
        new_vectors, new_ids, _ = read_outputs(second, name)
        row = {image_id: i for i, image_id in enumerate(new_ids)}
        np.testing.assert_array_equal(new_vectors[[row[i] for i in old_ids]], old_vectors)


def test_cache_is_keyed_by_content_and_encoder_identity(tmp_path):
    layout, _ = make_run(tmp_path, n_good=4, broken=False)
    embed_corpus(config(COLOR), "color", layout)
    # Same pictures under other names in another run: still hits.
    moved, _ = make_run(tmp_path / "elsewhere", n_good=4, broken=False, run="../run-b")
    assert moved.root.parent == layout.root.parent
    assert embed_corpus(config(COLOR), "color", moved)["reused"] == 4
    # Another identity (a different vector size) never sees those entries.
    assert embed_corpus(config({**COLOR, "dim": 48}), "color", moved)["reused"] == 0
    # The cache can be turned off, or moved.
    assert embed_corpus(config(COLOR, cache=False), "color", moved)["reused"] == 0
    custom = config(COLOR, cache_dir="shared-cache")
    assert cache_root(custom, layout) == layout.root.parent / "shared-cache"
    assert embed_corpus(custom, "color", layout)["reused"] == 0
    assert embed_corpus(custom, "color", layout)["reused"] == 4
    assert config(COLOR, cache_dir=str(tmp_path / "abs")).embed.cache_dir == str(tmp_path / "abs")


def test_cache_survives_a_vanished_segment(tmp_path):
    layout, _ = make_run(tmp_path, n_good=4, broken=False)
    stats = embed_corpus(config(COLOR), "color", layout)
    folder = cache_root(config(COLOR), layout) / stats["identity"]
    for segment in folder.glob("seg-*.npy"):
        segment.unlink()
    again = embed_corpus(config(COLOR), "color", layout)
    assert (again["reused"], again["computed"]) == (0, 4)


# ---------------------------------------------------------------------------------------------
# Work items for Airflow


def test_work_items_map_over_shard_groups_and_finalize_to_the_single_call_result(tmp_path, tiny_clip_dir):
    layout, _ = make_run(tmp_path, n_good=10)
    encs = (COLOR, TEXTURE, CAPTION, {"name": "clip", "kind": "clip_image", "model": str(tiny_clip_dir)})
    cfg = config(*encs, shard_size=3, cache=False)
    items = plan_embed_work(cfg, layout)
    json.dumps(items)  # small and JSON-able: they travel through XCom
    # One item per (encoder group, shard): image encoders of one device share a decode.
    assert [(i["encoders"], i["shard"], i["device"]) for i in items] == [
        *[(["color", "texture"], s, "cpu") for s in range(5)],
        *[(["clip"], s, "gpu") for s in range(5)],
        *[(["caption"], s, "cpu") for s in range(5)],
    ]
    assert len({i["id"] for i in items}) == len(items)
    with pytest.raises(ItemsNotDone, match="5 of 5 work item"):
        finalize_embed(cfg, layout, "color")
    for item in reversed(items):  # mapped tasks finish in any order
        result = run_embed_work(cfg, layout, [item])
        assert all(r["shards_skipped"] == 0 for r in result["encoders"].values())
    rerun = run_embed_work(cfg, layout, items[:2])
    assert rerun["encoders"]["color"] == {"shards_skipped": 2, "reused": 0, "computed": 0}
    mapped = {e["name"]: (finalize_embed(cfg, layout, e["name"]), read_outputs(layout, e["name"])) for e in encs}

    single = same_corpus(layout, tmp_path / "single")
    for enc in encs:
        stats = embed_corpus(cfg, enc["name"], single)
        assert stats == mapped[enc["name"]][0]
        assert_same_outputs(read_outputs(single, enc["name"]), mapped[enc["name"]][1])


def test_a_work_item_of_a_replaced_images_table_is_refused(tmp_path):
    layout, _ = make_run(tmp_path, n_good=4, broken=False)
    items = plan_embed_work(config(COLOR), layout)
    make_run(tmp_path, n_good=5, broken=False)  # ingest ran again: a new images.parquet
    plan_embed_work(config(COLOR), layout)
    with pytest.raises(FileNotFoundError, match="plan the embed work again"):
        run_embed_work(config(COLOR), layout, items[:1])


# ---------------------------------------------------------------------------------------------
# Precomputed input


def _clip_retrieval_output(root: Path, layout: RunLayout, dim: int = 8, extra: int = 2, skip: int = 1):
    """clip-retrieval's layout over the corpus (minus `skip` images, plus `extra` unknown rows),
    split in two parts, float16 as clip-retrieval writes. Returns {image_id: raw vector}."""
    rows = pq.read_table(layout.images).to_pylist()[skip:]
    rng = np.random.default_rng(0)
    entries = [(r["path"], r["image_id"]) for r in rows] + [(f"/elsewhere/x{i}.jpg", None) for i in range(extra)]
    raw = rng.standard_normal((len(entries), dim)).astype(np.float16)
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True)
    half = len(entries) // 2
    for part, (lo, hi) in enumerate(((0, half), (half, len(entries)))):
        np.save(root / "img_emb" / f"img_emb_{part}.npy", raw[lo:hi])
        np.save(root / "text_emb" / f"text_emb_{part}.npy", raw[lo:hi][:, ::-1].copy())
        pq.write_table(
            pa.table({"image_path": [e[0] for e in entries[lo:hi]], "caption": ["c"] * (hi - lo)}),
            root / "metadata" / f"metadata_{part}.parquet",
        )
    return {image_id: raw[i] for i, (_, image_id) in enumerate(entries) if image_id}


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_precomputed_clip_retrieval_folder(tmp_path):
    layout, bad = make_run(tmp_path, n_good=6)
    source = tmp_path / "clip-retrieval"
    raw = _clip_retrieval_output(source, layout)
    images = pq.read_table(layout.images).to_pylist()
    missing_path = images[0]["path"]
    enc = {"name": "pre", "kind": "precomputed", "precomputed": {"path": str(source)}}
    stats = embed_corpus(config(enc, shard_size=4), "pre", layout)
    vectors, ids, quarantine = read_outputs(layout, "pre")
    assert ids == [r["image_id"] for r in images[1:]]
    np.testing.assert_allclose(vectors, _unit(np.stack([raw[i] for i in ids])), atol=1e-6)
    assert [(q["path"], q["reason"]) for q in quarantine] == [(missing_path, "no_precomputed_embedding")]
    assert stats["dim"] == 8 and stats["precomputed_rows"] == 8 + 2
    assert stats["precomputed_ignored_rows"] == 2 and stats["precomputed_matched_images"] == 8
    # The caption vectors of the same output, as a text view.
    text = {"name": "pre-text", "kind": "precomputed", "precomputed": {"path": str(source), "embeddings": "text"}}
    embed_corpus(config(text), "pre-text", layout)
    text_vectors, text_ids, _ = read_outputs(layout, "pre-text")
    assert text_ids == ids
    np.testing.assert_allclose(text_vectors, _unit(np.stack([raw[i][::-1] for i in ids])), atol=1e-6)
    assert config(text).encoder("pre-text").modality == "text"


def test_precomputed_plain_npy_with_ids_and_relative_paths(tmp_path):
    layout, _ = make_run(tmp_path, n_good=5, broken=False)
    images = pq.read_table(layout.images).to_pylist()
    vectors = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    vectors[3] = 0  # an all-zero row cannot be normalised
    np.save(tmp_path / "vectors.npy", vectors)
    (tmp_path / "ids.txt").write_text("".join(f"{r['sha256']}\n" for r in images))
    enc = {"name": "pre", "kind": "precomputed",
           "precomputed": {"path": str(tmp_path / "vectors.npy"), "ids": str(tmp_path / "ids.txt"), "match_on": "sha256"}}
    stats = embed_corpus(config(enc), "pre", layout)
    got, ids, quarantine = read_outputs(layout, "pre")
    assert ids == [r["image_id"] for i, r in enumerate(images) if i != 3]
    np.testing.assert_allclose(got, _unit(vectors[[0, 1, 2, 4]]), atol=1e-6)
    assert [q["reason"] for q in quarantine] == ["zero_embedding"] and stats["embedded"] == 4

    # Vectors regenerated in place: shards read from the old file are read again.
    cfg = config(enc, shard_size=2)
    run_embed_work(cfg, layout, plan_embed_work(cfg, layout)[:1])
    np.save(tmp_path / "vectors.npy", vectors[::-1].copy())
    os.utime(tmp_path / "vectors.npy", ns=(1, 1))  # (changes are seen by size and mtime, not content)
    embed_corpus(cfg, "pre", layout)
    np.testing.assert_allclose(read_outputs(layout, "pre")[0], _unit(vectors[::-1][[0, 2, 3, 4]]), atol=1e-6)

    # clip-retrieval writes paths as given on its command line: relative ones are resolved.
    pq.write_table(pa.table({"image_path": [os.path.relpath(r["path"], tmp_path) for r in images]}), tmp_path / "ids.parquet")
    rel = {"name": "pre", "kind": "precomputed", "precomputed": {
        "path": str(tmp_path / "vectors.npy"), "ids": str(tmp_path / "ids.parquet"), "path_root": str(tmp_path)}}
    assert embed_corpus(config(rel), "pre", layout)["embedded"] == 4


def test_precomputed_webdataset_keys(tmp_path):
    """img2dataset keys ('000123') name tar members ('/x/shard.tar#000123.jpg')."""
    layout = RunLayout(tmp_path / "run")
    rows = [{"image_id": f"{i:016x}", "sha256": f"{i:064x}", "path": f"/data/{i % 2:05d}.tar#{i:09d}.jpg",
             "caption": "c"} for i in range(4)]
    write_parquet(pa.Table.from_pylist(rows), layout.images)
    np.save(tmp_path / "v.npy", np.eye(4, 8, dtype=np.float32)[::-1].copy())
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(4)][::-1]}), tmp_path / "keys.parquet")
    enc = {"name": "pre", "kind": "precomputed", "precomputed": {
        "path": str(tmp_path / "v.npy"), "ids": str(tmp_path / "keys.parquet"), "match_on": "key", "column": "key"}}
    embed_corpus(config(enc), "pre", layout)
    vectors, ids, _ = read_outputs(layout, "pre")
    assert ids == [r["image_id"] for r in rows]
    np.testing.assert_array_equal(vectors, np.eye(4, 8, dtype=np.float32))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("count", "count mismatch: img_emb_1.npy has 6 vectors, metadata_1.parquet 5 keys"),
        ("dims", "dimension mismatch between files: [8, 9]"),
        ("config_dim", "dimension mismatch: vectors have 8 dimensions, the config says dim 16"),
        ("column", "metadata_0.parquet has no column 'image_path'"),
    ],
)
def test_precomputed_mismatches_are_one_line_errors(tmp_path, breakage, message):
    layout, _ = make_run(tmp_path, n_good=8, broken=False)
    source = tmp_path / "clip-retrieval"
    _clip_retrieval_output(source, layout, extra=1, skip=0)
    enc = {"name": "pre", "kind": "precomputed", "precomputed": {"path": str(source)}}
    if breakage == "count":
        np.save(source / "img_emb" / "img_emb_1.npy", np.ones((6, 8), np.float16))
    elif breakage == "dims":
        np.save(source / "img_emb" / "img_emb_1.npy", np.ones((5, 9), np.float16))
    elif breakage == "config_dim":
        enc["dim"] = 16
    else:
        pq.write_table(pa.table({"url": ["u"] * 4}), source / "metadata" / "metadata_0.parquet")
    with pytest.raises(ConfigError) as err:
        embed_corpus(config(enc), "pre", layout)
    assert message in str(err.value) and "\n" not in str(err.value) and "'pre'" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Config keys of the embed stage


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"embed": {"shard_size": 0}}, "embed.shard_size", "greater than or equal to 1"),
        ({"embed": {"decode_workers": -1}}, "embed.decode_workers", "'auto' or 0..256"),
        ({"embed": {"cache_directory": "x"}}, "embed.cache_directory", "unknown key"),
        ({"encoders": [{"name": "e", "kind": "classic_texture", "image_size": 64}]}, "encoders.0", "image_size applies"),
        ({"encoders": [{"name": "e", "kind": "clip_image", "model": "m", "pretrained": "x"}]}, "encoders.0", "only for open_clip"),
        ({"encoders": [{"name": "e", "kind": "precomputed"}]}, "encoders.0", "needs a 'precomputed' section"),
    ],
)
def test_bad_embed_config_is_one_line_naming_the_key(data, key, words):
    data = {"encoders": [COLOR], **data}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    message = str(err.value)
    assert "\n" not in message and f": {key}:" in message and words in message


@pytest.mark.parametrize(
    "encoder, key, words",
    [
        ({"name": "e", "kind": "precomputed", "precomputed": {"path": "/nowhere"}},
         "encoders.0.precomputed.path", "neither a .npy file nor a clip-retrieval folder"),
        ({"name": "e", "kind": "open_clip_image", "model": "/nowhere/eva"}, "encoders.0.model", "open_clip_config.json"),
        ({"name": "e", "kind": "dinov2", "model": "/nowhere/dinov2"}, "encoders.0.model", "config.json"),
    ],
)
def test_missing_model_files_stop_the_run_before_it_starts_but_not_other_stages(tmp_path, capsys, encoder, key, words):
    """A model folder is the embed stage's business: loading the config on a worker that lacks it
    works (it may run ingest), and check-config / run refuse with one line naming the key."""
    import yaml

    from megapairs_ops.cli import main
    from megapairs_ops.preflight import preflight

    cfg = parse_config({"encoders": [encoder]})
    assert preflight(cfg, {"ingest"}) == []
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"encoders": [encoder]}))
    assert main(["check-config", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f": {key}: " in line and words in line


def test_precomputed_npy_config_needs_an_ids_file(tmp_path):
    np.save(tmp_path / "v.npy", np.ones((2, 8), np.float32))
    with pytest.raises(ConfigError, match="needs 'ids'"):
        parse_config({"encoders": [{"name": "p", "kind": "precomputed", "precomputed": {"path": str(tmp_path / "v.npy")}}]})
