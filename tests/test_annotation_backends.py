import socket

import numpy as np
import pytest
from PIL import Image

from megapairs_ops.annotation.backends import (
    BackendError,
    DescribeRequest,
    InstructRequest,
    make_backend,
)
from megapairs_ops.annotation.openai_backend import OpenAIBackend, retry_after_seconds
from megapairs_ops.annotation.parsing import check_description, check_instructions, parse_instructions
from megapairs_ops.annotation.template import MODEL_NAME, TemplateBackend
from megapairs_ops.config import StepConfig
from tests.fixtures.llm_server import REFUSAL_TEXT, fake_instructions

Q_CAPTION = "A brown dog running on a sandy beach at sunset"
T_CAPTION = "A black dog sitting on a snowy beach in winter"


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory):
    """A wide query and a tall target, so their order survives resizing in the request."""
    root = tmp_path_factory.mktemp("pair-images")
    rng = np.random.default_rng(0)
    q, t = root / "query.png", root / "target.jpg"
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(q)
    Image.fromarray(rng.integers(0, 255, (400, 100, 3), dtype=np.uint8)).save(t)
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    return {"q": str(q), "t": str(t), "broken": str(broken), "missing": str(root / "nope.png")}


def describe_request(images, key="0:p1:describe:1", word_num=80, q=None, t=None, prompt=None):
    return DescribeRequest(
        pair_id="p1",
        seed_key=key,
        prompt=prompt or f"Describe the two images in about {word_num} words.",
        word_num=word_num,
        q_image=q or images["q"],
        t_image=t or images["t"],
        q_caption=Q_CAPTION,
        t_caption=T_CAPTION,
    )


def instruct_request(key="0:p1:instruct:1", description="Both images show a dog on a beach.", prompt=None):
    return InstructRequest(
        pair_id="p1",
        seed_key=key,
        prompt=prompt or f"Write instructions for: {description} [{key}]",
        description=description,
        q_caption=Q_CAPTION,
        t_caption=T_CAPTION,
    )


# -- template baseline ------------------------------------------------------------------------


@pytest.mark.parametrize("word_num", [60, 75, 100])
@pytest.mark.parametrize(
    "captions",
    [
        (Q_CAPTION, T_CAPTION),
        ("Red sports car on a wet race track", "Blue sports car on a wet race track with a white stripe"),
        ("", ""),
        ("Sunflowers", "A very long recaption " + "describing many different objects and colours " * 30),
    ],
)
def test_template_baseline_output_passes_checks(pair_images, word_num, captions):
    backend = make_backend(StepConfig(backend="template"))
    assert isinstance(backend, TemplateBackend) and backend.model_name == MODEL_NAME == "template-baseline-v1"
    req = describe_request(pair_images, word_num=word_num)
    req = DescribeRequest(**{**req.__dict__, "q_caption": captions[0], "t_caption": captions[1]})
    (desc,) = backend.describe([req])
    assert desc.ok and desc.model == MODEL_NAME
    assert check_description(desc.text, word_num) == (True, "")
    assert "baseline" in desc.text.lower()  # it says what it is
    ireq = InstructRequest("p1", "0:p1:instruct:1", "", desc.text, captions[0], captions[1])
    (out,) = backend.instruct([ireq])
    instructions = parse_instructions(out.text)
    assert len(instructions) >= 3
    assert check_instructions(instructions, desc.text, 3) == (True, "")


def test_template_baseline_uses_caption_differences_and_is_deterministic(pair_images):
    backend = TemplateBackend()
    (desc,) = backend.describe([describe_request(pair_images)])
    assert "dog" in desc.text and "snowy" in desc.text and "sunset" in desc.text
    (out1,) = backend.instruct([instruct_request(description=desc.text)])
    (out2,) = backend.instruct([instruct_request(description=desc.text)])
    assert out1 == out2
    instructions = parse_instructions(out1.text)
    assert len(set(instructions)) == len(instructions) >= 3
    assert any("snowy" in s for s in instructions)
    # Different seed keys vary the wording across pairs.
    texts = {backend.instruct([instruct_request(key=f"0:p{i}:instruct:1")])[0].text for i in range(10)}
    assert len(texts) > 1
    assert backend.counts == {"describe": 1, "instruct": 12}


# -- openai-compatible endpoint ---------------------------------------------------------------


def openai_step(llm_server, **kw):
    base = dict(backend="openai", model="fake-mllm", base_url=llm_server.base_url, concurrency=2, image_max_side=128)
    return StepConfig(**{**base, **kw})


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def test_describe_sends_two_images_then_text_with_auth(llm_server, pair_images, monkeypatch):
    llm_server.reset()
    llm_server.api_key = "s3cret-key"
    monkeypatch.setenv("FAKE_LLM_KEY", "s3cret-key")
    step = openai_step(llm_server, api_key_env="FAKE_LLM_KEY", max_tokens=321, temperature=0.4, top_p=0.8)
    with make_backend(step) as backend:
        assert isinstance(backend, OpenAIBackend)
        (result,) = backend.describe([describe_request(pair_images, word_num=70)])
    assert result.ok, result
    assert check_description(result.text, 70) == (True, "")
    (rec,) = llm_server.chat_requests()
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["Authorization"] == "Bearer s3cret-key"
    body = rec.body
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == ("fake-mllm", 321, 0.4, 0.8)
    assert isinstance(body["seed"], int)
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image_url", "image_url", "text"]
    assert message["content"][2]["text"] == "Describe the two images in about 70 words."
    q_img, t_img = rec.images()
    assert q_img.format == t_img.format == "JPEG"
    assert q_img.size == (128, 85) and t_img.size == (32, 128)  # query first, longest side capped


def test_instruct_sends_text_only(llm_server):
    llm_server.reset()
    with make_backend(openai_step(llm_server)) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.ok and result.model == "fake-mllm"
    assert len(parse_instructions(result.text)) == 3
    (rec,) = llm_server.chat_requests()
    assert rec.kind == "instruct" and rec.body["messages"][0]["content"].startswith("Write instructions")
    assert "Authorization" not in rec.headers


def test_results_keep_request_order_under_concurrency(llm_server):
    llm_server.reset()
    requests = [instruct_request(key=f"0:p{i}:instruct:1") for i in range(12)]
    with OpenAIBackend(openai_step(llm_server, concurrency=4)) as backend:
        results = backend.instruct(requests)
    for req, res in zip(requests, results):
        assert parse_instructions(res.text) == fake_instructions(req.prompt, req.seed)
    assert len(llm_server.chat_requests()) == 12


def test_retries_on_500_and_429_then_succeeds(llm_server):
    llm_server.reset()
    llm_server.inject("http_500", times=2)
    llm_server.inject("http_429", times=1, retry_after="7")
    sleeps = Sleeps()
    with OpenAIBackend(openai_step(llm_server), backoff_s=0.01, sleep=sleeps) as backend:
        (result,) = backend.instruct([instruct_request()])
        counts = backend.counts
    assert result.ok
    assert [r.fault for r in llm_server.chat_requests()] == ["http_500", "http_500", "http_429", None]
    assert len(sleeps) == 3
    assert sleeps[0] <= 0.01 and sleeps[1] <= 0.02  # exponential backoff with jitter
    assert sleeps[2] >= 7  # Retry-After honoured
    assert counts["http_requests"] == 4 and counts["http_retries"] == 3


def test_gives_up_after_bounded_attempts(llm_server):
    llm_server.reset()
    llm_server.inject("http_500", times=10)
    with OpenAIBackend(openai_step(llm_server), http_attempts=3, sleep=Sleeps()) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert not result.ok and result.error == "server_error" and "3 attempts" in result.detail
    assert len(llm_server.chat_requests()) == 3


def test_client_errors_and_malformed_bodies_are_not_retried(llm_server):
    llm_server.reset()
    llm_server.inject("http_400")
    llm_server.inject("malformed")
    llm_server.inject("no_choices")
    with OpenAIBackend(openai_step(llm_server, concurrency=1), sleep=Sleeps()) as backend:
        results = [backend.instruct([instruct_request()])[0] for _ in range(3)]
    assert [r.error for r in results] == ["http_error", "bad_response", "bad_response"]
    assert len(llm_server.chat_requests()) == 3


def test_refusal_text_comes_back_as_text(llm_server):
    """Refusals are a content problem: the stage's checks catch them and re-sample."""
    llm_server.reset()
    llm_server.inject("refusal", kind="instruct")
    with OpenAIBackend(openai_step(llm_server)) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.ok and result.text == REFUSAL_TEXT
    assert check_instructions(parse_instructions(result.text), "d", 3) == (False, "refusal")


def test_timeout_and_connection_errors(llm_server):
    llm_server.reset()
    llm_server.inject("slow", delay_s=1.0)
    with OpenAIBackend(openai_step(llm_server, timeout_s=0.2), http_attempts=1) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.error == "timeout"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    step = StepConfig(backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1")
    with OpenAIBackend(step, http_attempts=2, sleep=Sleeps()) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.error == "connection_error" and "2 attempts" in result.detail


def test_unreadable_images_fail_without_a_request(llm_server, pair_images):
    llm_server.reset()
    with OpenAIBackend(openai_step(llm_server)) as backend:
        broken, missing = backend.describe(
            [describe_request(pair_images, t=pair_images["broken"]), describe_request(pair_images, q=pair_images["missing"])]
        )
    assert broken.error in {"corrupt_image", "truncated_image"} and not broken.retryable
    assert missing.error == "image_missing" and not missing.retryable
    assert llm_server.chat_requests() == []


def test_missing_api_key_env_is_a_setup_error(llm_server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(BackendError, match="NO_SUCH_KEY_VAR"):
        make_backend(openai_step(llm_server, api_key_env="NO_SUCH_KEY_VAR"))


def test_models_endpoint(llm_server):
    import httpx

    resp = httpx.get(llm_server.base_url + "/models")
    assert resp.status_code == 200 and resp.json()["data"][0]["id"] == "fake-mllm"


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


# -- transformers (tiny models saved by the tests, loaded via from_pretrained) -----------------


def test_transformers_instruct_loads_tiny_lm_and_generates(tiny_causal_lm_dir):
    step = StepConfig(backend="transformers", model=str(tiny_causal_lm_dir), max_tokens=12, device="cpu")
    backend = make_backend(step)
    requests = [instruct_request(key=f"0:p{i}:instruct:1") for i in range(2)]
    first = backend.instruct(requests)
    again = backend.instruct(requests)
    assert all(r.ok and isinstance(r.text, str) and r.text for r in first)
    assert first == again  # per-request seeds: same request, same sample
    assert first[0].model == str(tiny_causal_lm_dir)


def test_transformers_greedy_decoding(tiny_causal_lm_dir):
    step = StepConfig(backend="transformers", model=str(tiny_causal_lm_dir), max_tokens=8, temperature=0.0)
    backend = make_backend(step)
    a = backend.instruct([instruct_request(key="0:a:instruct:1")])[0]
    b = backend.instruct([instruct_request(key="0:b:instruct:1")])[0]
    assert a.ok and a.text == b.text  # greedy ignores the seed; same prompt gives the same text


def test_transformers_describe_with_two_images(tiny_vlm_dir, pair_images):
    step = StepConfig(backend="transformers", model=str(tiny_vlm_dir), max_tokens=10, image_max_side=64)
    backend = make_backend(step)
    ok, broken = backend.describe(
        [describe_request(pair_images), describe_request(pair_images, t=pair_images["broken"])]
    )
    assert ok.ok and isinstance(ok.text, str)
    assert backend._two_images  # LLaVA takes both images, no side-by-side fallback
    assert broken.error in {"corrupt_image", "truncated_image"}


def test_structured_output_requests_json(llm_server):
    llm_server.reset()
    with OpenAIBackend(openai_step(llm_server)) as backend:
        backend.structured = True  # what a StepConfig `structured_output: true` would switch on
        (result,) = backend.instruct([instruct_request()])
    (rec,) = llm_server.chat_requests()
    assert rec.body["response_format"]["type"] == "json_schema"
    assert result.text.startswith("{") and len(parse_instructions(result.text)) == 3


def test_transformers_describe_falls_back_to_side_by_side(tiny_vlm_dir, pair_images, monkeypatch):
    step = StepConfig(backend="transformers", model=str(tiny_vlm_dir), max_tokens=4, image_max_side=64)
    backend = make_backend(step)
    real = backend._describe_images
    seen = []

    def one_image_only(processor, model, images, prompt, seed):
        seen.append([img.size for img in images])
        if len(images) > 1:
            raise ValueError("this model takes exactly one image")
        return real(processor, model, images, prompt, seed)

    monkeypatch.setattr(backend, "_describe_images", one_image_only)
    first, second = backend.describe([describe_request(pair_images), describe_request(pair_images, key="k2")])
    assert first.ok and second.ok and not backend._two_images
    # q is 64x43 and t 16x64 after resizing: the composite puts them side by side, query left.
    assert seen == [[(64, 43), (16, 64)], [(80, 64)], [(80, 64)]]
