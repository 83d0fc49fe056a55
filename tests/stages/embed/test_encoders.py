"""Encoders: the vector contract for every kind, the classic kinds' similarity behaviour, and the real
transformers loading path on tiny models built by the fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from megapairs_ops.config import ENCODER_KINDS, EncoderConfig
from megapairs_ops.stages.embed.encoders import (
    EncodeInputError,
    EncoderLoadError,
    build_encoder,
    kind_device,
)

CLASSIC_IMAGE_KINDS = ["classic_color_layout", "classic_texture"]


def scene(
    bg: tuple[int, int, int],
    objects: list[tuple[str, tuple[int, int, int], tuple[float, float]]],
    stripes: tuple[int, int, int] | None = None,
    side: int = 128,
) -> Image.Image:
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    if stripes is not None:
        for y in range(0, side, 16):
            draw.rectangle((0, y, side, y + 7), fill=stripes)
    r = side * 0.12
    for shape, colour, (x, y) in objects:
        cx, cy = x * side, y * side
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return img


RED, BLUE, GREEN, YELLOW = (205, 38, 38), (35, 75, 200), (46, 150, 60), (245, 210, 40)
WHITE, BLACK = (245, 245, 245), (25, 25, 25)


def images_for_tests() -> list[Image.Image]:
    return [
        scene(BLUE, [("circle", RED, (0.3, 0.3))]),
        scene(WHITE, [("square", GREEN, (0.6, 0.6)), ("circle", YELLOW, (0.2, 0.7))], stripes=BLACK),
        Image.new("RGB", (40, 90), (128, 128, 128)),
        scene(YELLOW, [("circle", BLUE, (0.5, 0.5))], side=200),
    ]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


# ---------------------------------------------------------------------------------------------
# The vector contract


@pytest.mark.parametrize("kind", CLASSIC_IMAGE_KINDS)
@pytest.mark.parametrize("dim", [512, 48])
def test_classic_image_vectors_are_unit_float32_and_deterministic(kind, dim):
    enc = EncoderConfig(name="e", kind=kind, dim=dim)
    images = images_for_tests()
    first = build_encoder(enc).encode_images(images)
    again = build_encoder(enc).encode_images(images)
    assert first.shape == (len(images), dim)
    assert first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, again)
    # Batch composition does not change a row.
    np.testing.assert_array_equal(build_encoder(enc).encode_images(images[1:2])[0], first[1])


def test_text_hash_vectors_are_unit_float32_and_deterministic():
    enc = EncoderConfig(name="t", kind="classic_text_hash", dim=256)
    texts = ["Two red circles on a blue background.", "A yellow star in a green meadow."]
    vecs = build_encoder(enc).encode_texts(texts)
    assert vecs.shape == (2, 256) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs, build_encoder(enc).encode_texts(texts))


def test_text_hash_is_stable_across_processes():
    """Python's hash() is salted per process; the text view must not depend on it."""
    code = (
        "import json; from megapairs_ops.config import EncoderConfig; "
        "from megapairs_ops.stages.embed.encoders import build_encoder; "
        "e = build_encoder(EncoderConfig(name='t', kind='classic_text_hash', dim=64)); "
        "print(json.dumps(e.encode_texts(['a red circle on a blue sky'])[0].tolist()))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    here = build_encoder(EncoderConfig(name="t", kind="classic_text_hash", dim=64))
    vec = here.encode_texts(["a red circle on a blue sky"])[0]
    np.testing.assert_allclose(vec, json.loads(outputs[0]), atol=1e-7)


def test_empty_inputs_give_empty_arrays():
    for kind in CLASSIC_IMAGE_KINDS:
        encoder = build_encoder(EncoderConfig(name="e", kind=kind, dim=32))
        assert encoder.encode_images([]).shape == (0, 32)
    encoder = build_encoder(EncoderConfig(name="t", kind="classic_text_hash", dim=32))
    assert encoder.encode_texts([]).shape == (0, 32)


def test_text_hash_rejects_captions_without_content():
    encoder = build_encoder(EncoderConfig(name="t", kind="classic_text_hash"))
    with pytest.raises(EncodeInputError) as empty:
        encoder.prepare_text("   ")
    assert empty.value.reason == "empty_caption"
    with pytest.raises(EncodeInputError) as stop:
        encoder.prepare_text("the and of a")
    assert stop.value.reason == "no_features"


def test_wrong_modality_is_a_type_error():
    with pytest.raises(TypeError):
        build_encoder(EncoderConfig(name="t", kind="classic_text_hash")).encode_images([Image.new("RGB", (8, 8))])
    with pytest.raises(TypeError):
        build_encoder(EncoderConfig(name="c", kind="classic_color_layout")).encode_texts(["x"])


# ---------------------------------------------------------------------------------------------
# Classic kinds: related above unrelated, and the paper's band means something


def test_color_layout_ranks_related_above_unrelated():
    encoder = build_encoder(EncoderConfig(name="c", kind="classic_color_layout"))
    query = scene(BLUE, [("circle", RED, (0.3, 0.3)), ("square", YELLOW, (0.7, 0.7))])
    moved = scene(BLUE, [("circle", RED, (0.6, 0.3)), ("square", YELLOW, (0.3, 0.7))])
    other_objects = scene(BLUE, [("circle", GREEN, (0.3, 0.3)), ("square", WHITE, (0.7, 0.7))])
    unrelated = scene(YELLOW, [("circle", GREEN, (0.5, 0.5))])
    q, m, o, u = encoder.encode_images([query, moved, other_objects, unrelated])
    assert cosine(q, m) > cosine(q, o) > cosine(q, u)
    # Same picture with its objects moved: related, not a duplicate.
    assert 0.8 < cosine(q, m) < 0.96
    assert cosine(q, u) < 0.5


def test_texture_ranks_same_pattern_above_other_pattern():
    encoder = build_encoder(EncoderConfig(name="t", kind="classic_texture"))
    query = scene(WHITE, [("circle", RED, (0.3, 0.3))], stripes=BLACK)
    same_pattern = scene(YELLOW, [("square", BLUE, (0.7, 0.6))], stripes=GREEN)
    plain = scene(WHITE, [("circle", RED, (0.3, 0.3))])
    q, s, p = encoder.encode_images([query, same_pattern, plain])
    # Colour-blind: other colours and objects on the same stripes beat the same objects on a plain field.
    assert cosine(q, s) > cosine(q, p)
    assert cosine(q, s) > 0.8


def test_texture_centring_keeps_unrelated_textures_apart():
    encoder = build_encoder(EncoderConfig(name="t", kind="classic_texture"))
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    flat = Image.new("RGB", (128, 128), (90, 140, 200))
    n, f = encoder.encode_images([noise, flat])
    assert cosine(n, f) < 0.5


def test_text_hash_puts_paraphrases_in_band_and_unrelated_low():
    encoder = build_encoder(EncoderConfig(name="t", kind="classic_text_hash"))
    a, b, c = encoder.encode_texts(
        [
            "A picture of two red circles and a small blue star on a plain white background.",
            "Three red circles and a small blue star on a plain white background.",
            "A large green hexagon in a meadow under the sky.",
        ]
    )
    assert 0.8 < cosine(a, b) < 0.96
    assert cosine(a, c) < 0.7
    # Case and stopwords do not matter.
    x, y = encoder.encode_texts(["The RED circle", "red circle"])
    assert cosine(x, y) == pytest.approx(1.0, abs=1e-6)


def test_classic_identity_names_everything_that_changes_vectors():
    small = build_encoder(EncoderConfig(name="c", kind="classic_color_layout", dim=64)).identity
    large = build_encoder(EncoderConfig(name="c", kind="classic_color_layout", dim=512)).identity
    assert small != large
    assert {"kind", "model", "revision", "dtype", "preprocessing"} <= set(small)
    json.dumps(small)  # usable as a cache key


# ---------------------------------------------------------------------------------------------
# Devices


def test_every_kind_declares_its_device():
    for kind in ENCODER_KINDS:
        assert kind_device(kind) == ("cpu" if kind.startswith("classic_") or kind == "precomputed" else "gpu-preferred")
    with pytest.raises(KeyError, match="unknown encoder kind"):
        kind_device("nope")


# ---------------------------------------------------------------------------------------------
# Model-backed kinds through from_pretrained


def test_clip_image_loads_vision_tower_of_full_checkpoint(tiny_clip_dir):
    import torch
    from transformers import AutoImageProcessor, CLIPModel

    encoder = build_encoder(EncoderConfig(name="ci", kind="clip_image", model=str(tiny_clip_dir)))
    images = images_for_tests()
    vecs = encoder.encode_images(images)
    assert encoder.modality == "image" and encoder.dim == 16
    assert vecs.shape == (len(images), 16) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs, encoder.encode_images(images))
    # The tower-only load must reproduce the full model's projected image features.
    full = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_clip_dir, backend="pil")(images=images, return_tensors="pt")
    with torch.inference_mode():
        ref = full.get_image_features(**pixels).pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(vecs, ref, atol=1e-5)


def test_clip_text_loads_text_tower_and_truncates(tiny_clip_dir):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    encoder = build_encoder(EncoderConfig(name="ct", kind="clip_text", model=str(tiny_clip_dir)))
    texts = ["a red circle", "two blue squares on a striped background " * 20]
    vecs = encoder.encode_texts(texts)
    assert encoder.modality == "text" and encoder.dim == 16
    assert vecs.shape == (2, 16) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    full = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_clip_dir)(texts[:1], return_tensors="pt")
    with torch.inference_mode():
        ref = full.get_text_features(**tokens).pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(vecs[:1], ref, atol=1e-5)
    with pytest.raises(EncodeInputError) as empty:
        encoder.prepare_text("")
    assert empty.value.reason == "empty_caption"


def test_dinov2_uses_cls_token_after_layernorm(tiny_dinov2_dir):
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    encoder = build_encoder(EncoderConfig(name="d", kind="dinov2", model=str(tiny_dinov2_dir)))
    images = images_for_tests()
    vecs = encoder.encode_images(images)
    assert encoder.dim == 24 and vecs.shape == (len(images), 24) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    model = Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_dinov2_dir, backend="pil")(images=images, return_tensors="pt")
    with torch.inference_mode():
        cls = model(**pixels).last_hidden_state[:, 0]
    np.testing.assert_allclose(vecs, torch.nn.functional.normalize(cls, dim=-1).numpy(), atol=1e-5)


def test_clip_image_accepts_other_contrastive_checkpoints(tiny_siglip_dir):
    import torch
    from transformers import AutoImageProcessor, SiglipModel

    encoder = build_encoder(EncoderConfig(name="s", kind="clip_image", model=str(tiny_siglip_dir)))
    images = images_for_tests()
    vecs = encoder.encode_images(images)
    assert encoder.dim == 32 and vecs.shape == (len(images), 32) and vecs.dtype == np.float32
    model = SiglipModel.from_pretrained(tiny_siglip_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_siglip_dir, backend="pil")(images=images, return_tensors="pt")
    with torch.inference_mode():
        ref = model.get_image_features(**pixels).pooler_output
    np.testing.assert_allclose(vecs, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5)


def test_hf_identity_tracks_weights(tiny_clip_dir, tmp_path):
    from tests.fixtures.tiny_models import build_tiny_clip

    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    a = build_encoder(EncoderConfig(name="ci", kind="clip_image", model=str(tiny_clip_dir))).identity
    b = build_encoder(EncoderConfig(name="ci", kind="clip_image", model=str(other))).identity
    assert a["kind"] == "clip_image" and a["dtype"] == "float32"
    assert a["content_digest"] != b["content_digest"]
    json.dumps(a)


def test_trust_remote_code_is_off_by_default(tmp_path):
    """A checkpoint that ships its own Python is refused, and its code never runs, unless opted in."""
    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    marker = tmp_path / "code-ran"
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "tiny-remote",
                "auto_map": {
                    "AutoConfig": "configuration_tiny.TinyConfig",
                    "AutoModel": "modeling_tiny.TinyModel",
                },
            }
        )
    )
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (model_dir / "configuration_tiny.py").write_text(payload)
    (model_dir / "modeling_tiny.py").write_text(payload)
    enc = EncoderConfig(name="r", kind="clip_image", model=str(model_dir))
    assert enc.trust_remote_code is False
    with pytest.raises(EncoderLoadError, match="trust_remote_code"):
        build_encoder(enc)
    assert not marker.exists()


def test_missing_model_directory_is_a_clear_error(tiny_clip_dir, tmp_path):
    model_dir = tmp_path / "gone"
    shutil.copytree(tiny_clip_dir, model_dir)
    enc = EncoderConfig(name="ci", kind="clip_image", model=str(model_dir))
    shutil.rmtree(model_dir)  # e.g. a volume not mounted on the worker that runs the task
    with pytest.raises(EncoderLoadError) as err:
        build_encoder(enc)
    message = str(err.value)
    assert "'ci'" in message and str(model_dir) in message and "save_pretrained" in message


def test_uncached_hub_id_offline_is_a_clear_error():
    enc = EncoderConfig(name="hub", kind="dinov2", model="no-such-org/no-such-model-xyz")
    with pytest.raises(EncoderLoadError, match="no-such-org/no-such-model-xyz"):
        build_encoder(enc)


def test_checkpoint_without_the_tower_weights_is_refused(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "text-only"
    shutil.copytree(tiny_clip_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    text_only = {k: v for k, v in weights.items() if not k.startswith("vision_model.")}
    save_file(text_only, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncoderLoadError, match="lacks"):
        build_encoder(EncoderConfig(name="ci", kind="clip_image", model=str(model_dir)))


def test_cuda_request_without_cuda_is_a_clear_error(tiny_dinov2_dir):
    import torch

    enc = EncoderConfig(
        name="d", kind="dinov2", model=str(tiny_dinov2_dir), device="cuda", dtype="float16"
    )
    if torch.cuda.is_available():
        encoder = build_encoder(enc)
        vecs = encoder.encode_images(images_for_tests())
        assert encoder.identity["dtype"] == "float16" and vecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    else:
        with pytest.raises(EncoderLoadError, match="no CUDA device"):
            build_encoder(enc)


# ---------------------------------------------------------------------------------------------
# Preprocessing split: resize + crop in the decode worker, normalise on the batch


def odd_images() -> list[Image.Image]:
    """Odd sizes and aspect ratios, one smaller than the crop (padded), one with an odd margin."""
    rng = np.random.default_rng(3)
    sizes = [(45, 81), (200, 31), (33, 32), (20, 10), (64, 64), (97, 130)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes] + images_for_tests()


@pytest.mark.parametrize("fixture", ["tiny_clip_dir", "tiny_dinov2_dir", "tiny_siglip_dir"])
def test_pixel_recipe_reproduces_the_pil_processor(fixture, request):
    from transformers import AutoImageProcessor

    from megapairs_ops.stages.embed.encoders.pixels import PixelRecipe, recipe_from_hf_processor

    processor = AutoImageProcessor.from_pretrained(request.getfixturevalue(fixture), backend="pil")
    recipe = recipe_from_hf_processor(processor, None)
    assert isinstance(recipe, PixelRecipe)
    for image in odd_images():
        item = recipe(image)
        assert item.dtype == np.uint8 and item.shape == (*recipe.out_size, 3)
        ours = recipe.to_model_input(recipe.collate([item]), "cpu", __import__("torch").float32).numpy()
        reference = processor(images=[image], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_hf_image_encoders_use_the_recipe_and_pickle_for_workers(tiny_clip_dir):
    import pickle

    encoder = build_encoder(EncoderConfig(name="ci", kind="clip_image", model=str(tiny_clip_dir)))
    assert encoder.identity["preprocessing"]["pixels"]["recipe"].startswith("pil-resize-crop-uint8")
    preprocessor = pickle.loads(pickle.dumps(encoder.image_preprocessor()))
    image = images_for_tests()[1]
    np.testing.assert_array_equal(preprocessor(image), encoder.prepare_image(image))
    batch = preprocessor.collate([preprocessor(im) for im in images_for_tests()])
    np.testing.assert_array_equal(encoder.encode_batch(batch), encoder.encode_images(images_for_tests()))
    classic = build_encoder(EncoderConfig(name="c", kind="classic_texture", dim=32))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(classic.image_preprocessor()))(image), classic.prepare_image(image))


def test_processor_the_recipe_does_not_cover_runs_as_is(tiny_clip_dir, tmp_path):
    import torch
    from transformers import AutoImageProcessor, CLIPImageProcessorPil, CLIPModel

    model_dir = tmp_path / "clip-longest-edge"
    shutil.copytree(tiny_clip_dir, model_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": 32, "longest_edge": 40}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(model_dir)
    encoder = build_encoder(EncoderConfig(name="ci", kind="clip_image", model=str(model_dir)))
    assert encoder.identity["preprocessing"]["pixels"] == {"processor_fallback": True}
    images = odd_images()
    pixels = AutoImageProcessor.from_pretrained(model_dir, backend="pil")(images=images, return_tensors="pt")
    with torch.inference_mode():
        ref = CLIPModel.from_pretrained(model_dir).eval().get_image_features(**pixels).pooler_output
    np.testing.assert_allclose(encoder.encode_images(images), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    with pytest.raises(EncoderLoadError, match="image_size is not supported"):
        build_encoder(EncoderConfig(name="ci", kind="clip_image", model=str(model_dir), image_size=48))


@pytest.mark.parametrize("kind, fixture", [("clip_image", "tiny_clip_dir"), ("dinov2", "tiny_dinov2_dir")])
def test_image_size_resizes_input_and_position_embeddings(kind, fixture, request):
    import torch
    from transformers import AutoImageProcessor, CLIPModel, Dinov2Model

    model_dir = request.getfixturevalue(fixture)
    native = build_encoder(EncoderConfig(name="e", kind=kind, model=str(model_dir)))
    larger = build_encoder(EncoderConfig(name="e", kind=kind, model=str(model_dir), image_size=48))
    assert larger.identity != native.identity and larger.dim == native.dim
    images = odd_images()
    processor = AutoImageProcessor.from_pretrained(
        model_dir, backend="pil", size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}
    )
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        if kind == "clip_image":
            model = CLIPModel.from_pretrained(model_dir).eval()
            ref = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
        else:
            ref = Dinov2Model.from_pretrained(model_dir).eval()(pixel_values=pixels).pooler_output
    np.testing.assert_allclose(larger.encode_images(images), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)


def test_open_clip_recipe_follows_its_preprocess_cfg():
    from types import SimpleNamespace

    from megapairs_ops.stages.embed.encoders.pixels import recipe_from_open_clip

    base = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    shortest = recipe_from_open_clip(SimpleNamespace(size=224, resize_mode="shortest", **base), None)
    assert (shortest.resize, shortest.crop, shortest.crop_rounding) == (("shortest_edge", 224), (224, 224), "round")
    squash = recipe_from_open_clip(SimpleNamespace(size=(224, 224), resize_mode="squash", **base), None)
    assert (squash.resize, squash.crop) == (("exact", (224, 224)), None)
    assert recipe_from_open_clip(SimpleNamespace(size=224, resize_mode="longest", **base), None) is None
    assert recipe_from_open_clip(SimpleNamespace(size=(224, 160), resize_mode="shortest", **base), None) is None
    # torchvision rounds the crop offset where transformers floors it: a 3-pixel margin splits 2/1.
    image = Image.fromarray(np.arange(5 * 2 * 3, dtype=np.uint8).reshape(2, 5, 3))
    narrow = recipe_from_open_clip(SimpleNamespace(size=2, resize_mode="shortest", **base), None)
    np.testing.assert_array_equal(narrow(image), np.asarray(image)[:, 2:4])


def test_open_clip_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an image without open_clip_torch sees
    enc = EncoderConfig(name="eva", kind="open_clip_image", model="EVA02-L-14", pretrained="merged2b_s4b_b131k")
    with pytest.raises(EncoderLoadError, match="open_clip package is not installed"):
        build_encoder(enc)


def test_open_clip_pretrained_file_must_exist(tmp_path):
    from megapairs_ops.config import local_problems, parse_config

    cfg = parse_config({"encoders": [{"name": "eva", "kind": "open_clip_image", "model": "EVA02-L-14",
                                      "pretrained": str(tmp_path / "w.bin")}]})
    assert local_problems(cfg, {"embed"}) == [
        ("encoders.0.pretrained", f"pretrained weights file '{tmp_path / 'w.bin'}' not found")]
    assert local_problems(cfg, {"ingest"}) == []


@pytest.mark.open_clip
def test_open_clip_image_and_text_load_through_open_clip(tiny_open_clip_dir):
    """The open_clip kinds load a saved checkpoint through open_clip itself and match open_clip's
    own preprocess + encode (`make test` runs this in its open_clip pass)."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip_dir}")
    images = odd_images()
    texts = ["a red circle", "two blue squares on a striped background " * 20]
    with torch.inference_mode():
        image_ref = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True).numpy()
        text_ref = model.encode_text(tokenizer(texts), normalize=True).numpy()

    image = build_encoder(EncoderConfig(name="oi", kind="open_clip_image", model=str(tiny_open_clip_dir)))
    assert image.dim == 16 and image.identity["preprocessing"]["recipe"].startswith("pil-resize-crop-uint8")
    np.testing.assert_allclose(image.encode_images(images), image_ref, atol=1e-5)
    text = build_encoder(EncoderConfig(name="ot", kind="open_clip_text", model=f"local-dir:{tiny_open_clip_dir}"))
    np.testing.assert_allclose(text.encode_texts(texts), text_ref, atol=1e-5)
    sized = build_encoder(EncoderConfig(name="oi", kind="open_clip_image", model=str(tiny_open_clip_dir), image_size=48))
    assert sized.encode_images(images).shape == (len(images), 16) and sized.identity != image.identity
    with pytest.raises(EncoderLoadError, match="needs 'pretrained'"):
        build_encoder(EncoderConfig(name="oi", kind="open_clip_image", model="ViT-B-32"))
