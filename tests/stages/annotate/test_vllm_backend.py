"""The in-process vLLM backend. vLLM is not installable here (it pins its own CUDA torch), so:

- the request-building functions are tested for real (plain data, no vLLM needed);
- `test_STUB_*` tests inject a FAKE `vllm` module into sys.modules. They check only OUR wiring
  (what we pass to vllm.LLM / LLM.chat / SamplingParams and how we read the outputs), not vLLM,
  not a model and not a GPU. The engine path itself runs only on a GPU worker.
"""

import sys
import types

import pytest

from megapairs_ops.config import ConfigError, StepConfig, parse_config
from megapairs_ops.stages.annotate.backends import BackendError, make_backend
from megapairs_ops.stages.annotate.backends.vllm_backend import describe_messages, engine_kwargs, sampling_kwargs
from megapairs_ops.stages.annotate.parsing import instructions_schema
from tests.fixtures.annotation import describe_request, instruct_request

INTERNVL = dict(
    backend="vllm",
    model="OpenGVLab/InternVL2-26B",
    trust_remote_code=True,
    temperature=0.7,
    top_p=0.9,
    max_tokens=256,
    stop=["<|im_end|>"],
    image_max_side=64,
    vllm={"tensor_parallel_size": 2, "max_model_len": 8192, "max_image_tiles": 6, "gpu_memory_utilization": 0.85},
)


def test_engine_kwargs_for_a_two_image_internvl_prompt():
    step = StepConfig(**INTERNVL)
    kw = engine_kwargs(step, multimodal=True)
    assert kw["model"] == "OpenGVLab/InternVL2-26B" and kw["trust_remote_code"] is True
    assert kw["limit_mm_per_prompt"] == {"image": 2}
    assert kw["mm_processor_kwargs"] == {"max_dynamic_patch": 6}
    assert (kw["tensor_parallel_size"], kw["max_model_len"], kw["gpu_memory_utilization"]) == (2, 8192, 0.85)
    text_only = engine_kwargs(StepConfig(backend="vllm", model="meta-llama/Meta-Llama-3-8B-Instruct"), multimodal=False)
    assert "limit_mm_per_prompt" not in text_only and "mm_processor_kwargs" not in text_only
    assert "max_model_len" not in text_only  # the model's own default unless configured


def test_sampling_kwargs_come_from_the_step_and_the_request_seed():
    kw = sampling_kwargs(StepConfig(**INTERNVL), seed=1234)
    assert kw == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 256, "seed": 1234, "stop": ["<|im_end|>"]}
    assert "stop" not in sampling_kwargs(StepConfig(backend="vllm", model="m"), seed=1)


def test_describe_messages_put_both_images_before_the_prompt(pair_images):
    from PIL import Image

    q, t = Image.new("RGB", (8, 4)), Image.new("RGB", (4, 8))
    (message,) = describe_messages([q, t], "Describe.")
    assert message["role"] == "user"
    assert [p["type"] for p in message["content"]] == ["image_pil", "image_pil", "text"]
    assert message["content"][0]["image_pil"] is q and message["content"][2]["text"] == "Describe."


def test_importing_the_backend_does_not_import_vllm_and_building_it_needs_vllm():
    assert "vllm" not in sys.modules  # importing vllm_backend (above) loaded no vLLM
    with pytest.raises(BackendError, match="requirements-gpu.txt"):
        make_backend(StepConfig(**INTERNVL))


def test_vllm_config_validation():
    base = {"encoders": [{"name": "c", "kind": "classic_color_layout"}]}
    with pytest.raises(ConfigError, match="annotate.describe: .*backend 'vllm' needs 'model'"):
        parse_config({**base, "annotate": {"describe": {"backend": "vllm"}}})
    with pytest.raises(ConfigError, match="annotate.describe.vllm.max_image_tiles"):
        parse_config({**base, "annotate": {"describe": {**INTERNVL, "vllm": {"max_image_tiles": 0}}}})


# -- STUB: a fake `vllm` module; checks our wiring only ------------------------------------------


class _FakeCompletion:
    def __init__(self, text, n_tokens, finish_reason):
        self.text = text
        self.token_ids = list(range(n_tokens))
        self.finish_reason = finish_reason


class _FakeOutput:
    def __init__(self, text, n_prompt, n_tokens, finish_reason="stop"):
        self.prompt_token_ids = list(range(n_prompt))
        self.outputs = [_FakeCompletion(text, n_tokens, finish_reason)]


@pytest.fixture
def fake_vllm(monkeypatch):
    """STUB vLLM: records constructor kwargs and chat() calls; answers with canned text."""
    calls = {"init": [], "chat": []}

    class LLM:
        def __init__(self, **kwargs):
            calls["init"].append(kwargs)

        def chat(self, messages, sampling_params=None, use_tqdm=True):
            calls["chat"].append((messages, sampling_params, use_tqdm))
            if len(messages) > 1 and any("TOO LONG" in str(m) for m in messages):
                raise ValueError("prompt too long")
            out = []
            for conv in messages:
                content = conv[0]["content"]
                if isinstance(content, str) and "TOO LONG" in content:
                    raise ValueError("prompt too long")
                if isinstance(content, str) and "MAX TOKENS" in content:  # stopped by max_tokens
                    out.append(_FakeOutput('{"instructions": ["a b c", "d e', 11, 512, "length"))
                    continue
                out.append(_FakeOutput('{"instructions": ["a b c", "d e f", "g h i"]}', 11, 7))
            return out

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = StructuredOutputsParams
    vllm.sampling_params = sampling
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "vllm" else None)
    return calls


def test_STUB_describe_builds_two_image_chats_with_per_request_seeds(fake_vllm, pair_images):
    backend = make_backend(StepConfig(**INTERNVL))
    reqs = [describe_request(pair_images, key=f"0:p{i}:describe:1") for i in range(3)]
    broken = describe_request(pair_images, t=pair_images["broken"])
    results = backend.describe(reqs[:2] + [broken] + reqs[2:])
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].error in {"corrupt_image", "truncated_image"} and not results[2].retryable
    assert results[0].tokens_in == 11 and results[0].tokens_out == 7
    (init,) = fake_vllm["init"]
    assert init == engine_kwargs(StepConfig(**INTERNVL), multimodal=True)
    (messages, params, use_tqdm) = fake_vllm["chat"][0]
    assert len(messages) == 3 and use_tqdm is False  # the unreadable pair never reaches the engine
    content = messages[0][0]["content"]
    assert [p["type"] for p in content] == ["image_pil", "image_pil", "text"]
    assert content[0]["image_pil"].size == (64, 43) and content[1]["image_pil"].size == (16, 64)
    assert [p.kwargs["seed"] for p in params] == [r.seed for r in reqs]
    assert all("structured_outputs" not in p.kwargs for p in params)


def test_STUB_structured_instruct_and_batch_failure_isolation(fake_vllm):
    backend = make_backend(StepConfig(backend="vllm", model="meta-llama/Meta-Llama-3-8B-Instruct", structured_output=True))
    reqs = [instruct_request(key="0:a:instruct:1"), instruct_request(prompt="TOO LONG"), instruct_request(key="0:b:instruct:1")]
    results = backend.instruct(reqs)
    assert [r.ok for r in results] == [True, False, True] and results[1].error == "generation_error"
    assert "limit_mm_per_prompt" not in fake_vllm["init"][0]
    first_call_params = fake_vllm["chat"][0][1]
    schema = first_call_params[0].kwargs["structured_outputs"].json
    assert schema == instructions_schema(reqs[0].min_instructions, reqs[0].max_chars)
    assert len(fake_vllm["chat"]) == 1 + 3  # the failed batch, then one call per request


def test_STUB_an_answer_cut_by_max_tokens_is_truncated(fake_vllm):
    backend = make_backend(StepConfig(backend="vllm", model="meta-llama/Meta-Llama-3-8B-Instruct"))
    ok, cut = backend.instruct([instruct_request(), instruct_request(prompt="MAX TOKENS")])
    assert ok.ok and ok.error is None
    assert not cut.ok and cut.error == "truncated" and cut.retryable
    assert cut.detail.startswith("finish_reason=length after 512 tokens (max_tokens=512)")
