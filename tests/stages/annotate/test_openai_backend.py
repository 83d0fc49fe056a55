"""The OpenAI-compatible backend against a real HTTP server on loopback (tests/fixtures/llm_server.py)."""

import asyncio
import json
import logging
import socket

import pytest

from megapairs_ops.config import StepConfig
from megapairs_ops.stages.annotate.backends import BackendError, EndpointUnavailable, make_backend
from megapairs_ops.stages.annotate.backends.breaker import retry_after_seconds
from megapairs_ops.stages.annotate.backends.endpoint import resolve_endpoint
from megapairs_ops.stages.annotate.backends.openai_backend import OpenAIBackend
from megapairs_ops.stages.annotate.checks import check_description, check_instructions
from megapairs_ops.stages.annotate.parsing import parse_instructions
from tests.fixtures.annotation import describe_request, instruct_request
from tests.fixtures.llm_server import REFUSAL_TEXT, fake_instructions


def openai_step(llm_server, **kw):
    base = dict(
        backend="openai", model="fake-mllm", base_url=llm_server.base_url, concurrency=2, image_max_side=128,
        backoff_s=0.001, max_backoff_s=0.05, breaker_cooldown_s=0.02,
    )
    return StepConfig(**{**base, **kw})


class Sleeps(list):
    async def __call__(self, seconds):
        self.append(seconds)


def test_describe_sends_two_images_then_text_with_auth(llm_server, pair_images, monkeypatch):
    llm_server.reset()
    llm_server.api_key = "s3cret-key"
    monkeypatch.setenv("FAKE_LLM_KEY", "s3cret-key")
    step = openai_step(llm_server, api_key_env="FAKE_LLM_KEY", max_tokens=321, temperature=0.4, top_p=0.8, stop=["<|im_end|>"])
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
    assert body["stop"] == ["<|im_end|>"] and isinstance(body["seed"], int)
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image_url", "image_url", "text"]
    assert message["content"][2]["text"] == "Describe the two images in about 70 words."
    q_img, t_img = rec.images()
    assert q_img.format == t_img.format == "JPEG"
    assert q_img.size == (128, 85) and t_img.size == (32, 128)  # query first, longest side capped


def test_file_transport_sends_resized_copies_the_server_can_read(llm_server, pair_images, tmp_path):
    llm_server.reset()
    step = openai_step(llm_server, image_transport="file", image_cache_dir=str(tmp_path / "shared"))
    with make_backend(step) as backend:
        (first,) = backend.describe([describe_request(pair_images)])
        (again,) = backend.describe([describe_request(pair_images, key="k2")])
    assert first.ok and again.ok
    urls = [r.image_urls() for r in llm_server.chat_requests("describe")]
    assert all(u.startswith("file://") for pair in urls for u in pair) and urls[0] == urls[1]
    assert [img.size for img in llm_server.chat_requests()[0].images()] == [(128, 85), (32, 128)]
    assert len(list((tmp_path / "shared").rglob("*.jpg"))) == 2  # written once, reused


def test_file_transport_needs_a_shared_folder(llm_server):
    with pytest.raises(BackendError, match="image_cache_dir"):
        make_backend(openai_step(llm_server, image_transport="file"))


def test_instruct_sends_text_only_and_counts_usage(llm_server):
    llm_server.reset()
    with make_backend(openai_step(llm_server)) as backend:
        (result,) = backend.instruct([instruct_request()])
        stats = backend.stats["instruct"].to_dict()
    assert result.ok and result.model == "fake-mllm"
    assert len(parse_instructions(result.text)) == 3
    (rec,) = llm_server.chat_requests()
    assert rec.kind == "instruct" and rec.body["messages"][0]["content"].startswith("Write instructions")
    assert "Authorization" not in rec.headers and "response_format" not in rec.body
    assert result.tokens_in > 0 and result.tokens_out > 0
    assert stats["requests"] == 1 and stats["tokens_in"] == result.tokens_in and stats["latency_ms"]["count"] == 1


def test_structured_output_sends_a_json_schema(llm_server):
    llm_server.reset()
    with make_backend(openai_step(llm_server, structured_output=True)) as backend:
        assert backend.structured
        req = instruct_request()
        (result,) = backend.instruct([type(req)(**{**req.__dict__, "min_instructions": 4, "max_chars": 200})])
    (rec,) = llm_server.chat_requests()
    fmt = rec.body["response_format"]
    assert fmt["type"] == "json_schema"
    items = fmt["json_schema"]["schema"]["properties"]["instructions"]
    assert items["minItems"] == 4 and items["items"]["maxLength"] == 200
    assert result.text.startswith("{") and len(parse_instructions(result.text)) == 3


def test_concurrency_is_bounded_over_one_connection_pool(llm_server):
    llm_server.reset()
    llm_server.latency_s = 0.05
    requests = [instruct_request(key=f"0:p{i}:instruct:1") for i in range(12)]
    with OpenAIBackend(openai_step(llm_server, concurrency=3)) as backend:
        results = backend.instruct(requests)
    for req, res in zip(requests, results):  # results come back in request order
        assert parse_instructions(res.text) == fake_instructions(req.prompt, req.seed)
    assert llm_server.max_in_flight == 3 and llm_server.connections <= 3
    llm_server.reset()


def test_retries_on_500_with_exponential_backoff_then_succeeds(llm_server):
    llm_server.reset()
    llm_server.inject("http_500", times=2)
    sleeps = Sleeps()
    step = openai_step(llm_server, backoff_s=0.01, max_backoff_s=1.0, breaker_failures=10)
    with OpenAIBackend(step, sleep=sleeps) as backend:
        (result,) = backend.instruct([instruct_request()])
        stats = backend.stats["instruct"].to_dict()
    assert result.ok
    assert [r.fault for r in llm_server.chat_requests()] == ["http_500", "http_500", None]
    assert len(sleeps) == 2 and sleeps[0] <= 0.01 and sleeps[1] <= 0.02  # full jitter under 2^n * backoff
    assert stats["requests"] == 3 and stats["retries"] == 2 and stats["errors"] == {"server_error": 2}


def test_retry_after_is_honoured(llm_server):
    llm_server.reset()
    llm_server.inject("http_429", times=1, retry_after="0.3")
    with OpenAIBackend(openai_step(llm_server, max_backoff_s=5.0)) as backend:
        (result,) = backend.instruct([instruct_request()])
        stats = backend.stats["instruct"].to_dict()
    assert result.ok
    first, second = llm_server.chat_requests()
    assert first.fault == "http_429" and second.arrived - first.arrived >= 0.3
    assert stats["errors"] == {"rate_limited": 1} and stats["paused_s"] >= 0.3


def test_gives_up_after_bounded_attempts(llm_server):
    llm_server.reset()
    llm_server.inject("http_500", times=10)
    with OpenAIBackend(openai_step(llm_server, http_attempts=3, breaker_failures=100), sleep=Sleeps()) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert not result.ok and result.error == "server_error" and "3 attempts" in result.detail
    assert len(llm_server.chat_requests()) == 3
    llm_server.reset()


def test_client_errors_and_malformed_bodies_are_not_resent(llm_server):
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


@pytest.mark.parametrize(("fault", "reason"), [("truncated", "truncated"), ("content_filter", "content_filter")])
def test_an_answer_the_model_did_not_finish_is_a_failed_result(llm_server, pair_images, fault, reason):
    """finish_reason "length" (max_tokens) or "content_filter": whatever text came, it is no answer."""
    llm_server.reset()
    llm_server.inject(fault, kind="describe")
    llm_server.inject(fault, kind="instruct")
    with OpenAIBackend(openai_step(llm_server)) as backend:
        (described,) = backend.describe([describe_request(pair_images)])
        (instructed,) = backend.instruct([instruct_request()])
        stats = {s: backend.stats[s].to_dict() for s in backend.stats}
    finish = {"truncated": "length", "content_filter": "content_filter"}[fault]
    for result, step in ((described, "describe"), (instructed, "instruct")):
        assert not result.ok and result.error == reason and result.retryable
        assert result.detail.startswith(f"finish_reason={finish} after ") and "max_tokens=512" in result.detail
        assert stats[step]["errors"] == {reason: 1}
    assert len(llm_server.chat_requests()) == 2  # a bad answer is the stage's to re-sample, not re-sent here
    llm_server.reset()


def test_a_model_the_server_does_not_serve_stops_at_once(llm_server):
    llm_server.reset()
    llm_server.inject("http_404", times=10)
    with OpenAIBackend(openai_step(llm_server, model="no-such-model", http_attempts=4), sleep=Sleeps()) as backend:
        with pytest.raises(BackendError) as err:
            backend.instruct([instruct_request()])
    message = str(err.value)
    assert message.startswith("annotate.instruct.model: ") and "HTTP 404" in message
    assert "no-such-model" in message and "\n" not in message
    assert len(llm_server.chat_requests()) == 1
    llm_server.reset()


def test_timeouts_and_dropped_connections_are_resent(llm_server):
    llm_server.reset()
    llm_server.inject("slow", delay_s=1.0)
    with OpenAIBackend(openai_step(llm_server, timeout_s=0.2, http_attempts=1)) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.error == "timeout"
    llm_server.inject("drop", times=1)
    with OpenAIBackend(openai_step(llm_server, breaker_failures=10)) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.ok and [r.fault for r in llm_server.chat_requests()][-2:] == ["drop", None]
    llm_server.inject("drop", times=5)
    with OpenAIBackend(openai_step(llm_server, http_attempts=2, breaker_failures=10)) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.error == "connection_error" and "2 attempts" in result.detail
    llm_server.reset()


def test_unreachable_endpoint_is_a_connection_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    step = StepConfig(backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1", http_attempts=2,
                      backoff_s=0.001, max_backoff_s=0.01)
    with OpenAIBackend(step) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.error == "connection_error" and "2 attempts" in result.detail


def test_circuit_breaker_holds_requests_instead_of_burning_their_attempts(llm_server):
    """Twelve 500s in a row against eight requests with two attempts each: without the breaker
    several would fail; with it the outage is waited out and every request succeeds."""
    llm_server.reset()
    llm_server.inject("http_500", times=12)
    step = openai_step(llm_server, concurrency=4, http_attempts=2, breaker_failures=3, breaker_cooldown_s=0.01)
    requests = [instruct_request(key=f"0:p{i}:instruct:1") for i in range(8)]
    with OpenAIBackend(step) as backend:
        results = backend.instruct(requests)
        stats = backend.stats["instruct"].to_dict()
    assert all(r.ok for r in results), [r.detail for r in results if not r.ok]
    assert len(llm_server.chat_requests()) == 8 + 12
    assert stats["breaker_opens"] >= 1 and stats["paused_s"] > 0 and stats["errors"] == {"server_error": 12}


def test_outage_longer_than_the_limit_stops_with_endpoint_unavailable(llm_server):
    llm_server.reset()
    llm_server.inject("http_500", times=10_000)
    step = openai_step(llm_server, breaker_failures=2, breaker_cooldown_s=0.01, outage_timeout_s=0.3)
    with OpenAIBackend(step) as backend:
        with pytest.raises(EndpointUnavailable, match="outage_timeout_s"):
            backend.instruct([instruct_request(key=f"0:p{i}:instruct:1") for i in range(3)])
    sent = len(llm_server.chat_requests())
    assert sent < 40  # probes at most every max_backoff_s, not every request's attempts at full speed
    llm_server.reset()


def test_unreadable_images_fail_without_a_request(llm_server, pair_images):
    llm_server.reset()
    with OpenAIBackend(openai_step(llm_server)) as backend:
        broken, missing = backend.describe(
            [describe_request(pair_images, t=pair_images["broken"]), describe_request(pair_images, q=pair_images["missing"])]
        )
    assert broken.error in {"corrupt_image", "truncated_image"} and not broken.retryable
    assert missing.error == "image_missing" and not missing.retryable
    assert llm_server.chat_requests() == []


def test_async_calls_need_a_session(llm_server):
    backend = OpenAIBackend(openai_step(llm_server))
    with pytest.raises(RuntimeError, match="session"):
        asyncio.run(backend.ainstruct(instruct_request()))


# -- credentials ---------------------------------------------------------------------------------


def test_missing_api_key_env_is_a_setup_error(llm_server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(BackendError, match="NO_SUCH_KEY_VAR"):
        make_backend(openai_step(llm_server, api_key_env="NO_SUCH_KEY_VAR"))


def test_endpoint_and_key_from_an_airflow_connection(llm_server, monkeypatch):
    key = "sk-from-airflow-conn-4242"
    host, port = llm_server.host, llm_server.port
    monkeypatch.setenv(
        "AIRFLOW_CONN_FAKE_LLM", json.dumps({"conn_type": "http", "host": host, "port": port, "schema": "v1", "password": key})
    )
    monkeypatch.setenv("AIRFLOW_CONN_FAKE_LLM_URL", json.dumps({"conn_type": "http", "host": llm_server.base_url, "password": key}))
    llm_server.reset()
    llm_server.api_key = key
    step = StepConfig(backend="openai", model="fake-mllm", connection_id="fake_llm")
    endpoint = resolve_endpoint(step)
    assert endpoint.base_url == llm_server.base_url and endpoint.key_source == "connection:fake_llm"
    assert key not in repr(endpoint)
    assert resolve_endpoint(StepConfig(backend="openai", model="m", connection_id="fake_llm_url")).base_url == llm_server.base_url
    with make_backend(step) as backend:
        (result,) = backend.instruct([instruct_request()])
    assert result.ok and llm_server.chat_requests()[0].headers["Authorization"] == f"Bearer {key}"
    with pytest.raises(BackendError, match="no_such_conn"):
        resolve_endpoint(StepConfig(backend="openai", model="m", connection_id="no_such_conn"))
    llm_server.reset()


def test_the_key_never_leaves_the_authorization_header(llm_server, monkeypatch, caplog):
    key = "sk-live-DO-NOT-LEAK-0123456789"
    monkeypatch.setenv("LEAK_TEST_KEY", key)
    caplog.set_level(logging.DEBUG)
    llm_server.reset()
    llm_server.api_key = "the-right-key"  # ours is rejected, and the server echoes it back
    step = openai_step(llm_server, api_key_env="LEAK_TEST_KEY")
    with make_backend(step) as backend:
        with pytest.raises(BackendError) as err:
            backend.instruct([instruct_request()])
        stats = json.dumps({s: backend.stats[s].to_dict() for s in backend.stats})
        text = repr(backend) + repr(backend.endpoint) + str(step.model_dump())
    assert "rejected the credentials" in str(err.value) and "Bearer ***" in str(err.value)
    llm_server.api_key = None
    llm_server.inject("http_500", times=10)
    with make_backend(openai_step(llm_server, api_key_env="LEAK_TEST_KEY", http_attempts=2, breaker_failures=10)) as backend:
        (failed,) = backend.instruct([instruct_request()])
    assert failed.error == "server_error"
    assert llm_server.chat_requests()[-1].headers["Authorization"] == f"Bearer {key}"  # it was sent
    for where in (str(err.value), repr(err.value.__cause__), stats, text, failed.detail, caplog.text):
        assert key not in where
    llm_server.reset()


def test_models_endpoint(llm_server):
    import httpx

    resp = httpx.get(llm_server.base_url + "/models")
    assert resp.status_code == 200 and resp.json()["data"][0]["id"] == "fake-mllm"


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.25") == 0.25
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
