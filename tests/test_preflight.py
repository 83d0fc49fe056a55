"""Config mistakes surface before any stage starts: `check-config` and `run` exit 2 with one line
naming the key, and nothing is written to the run directory."""

import socket
from pathlib import Path

import pytest
import yaml

from megapairs_ops.cli import main
from megapairs_ops.config import parse_config
from megapairs_ops.preflight import preflight
from tests.fixtures.paths import REPO


def paper_like(llm_server, **step):
    """The demo profile with both annotation steps on the `openai` backend (the paper's code path)."""
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    base = {"backend": "openai", "model": "fake-mllm", "base_url": llm_server.base_url}
    data["annotate"]["describe"] = {**base, **step}
    data["annotate"]["instruct"] = dict(base)
    return data


def write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("a caption")
    return str(folder)


def refused(capsys, argv, key) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f": {key}: " in err[0], err
    return err[0]


@pytest.mark.parametrize("command", ["check-config", "run", "stage"])
def test_unknown_prompt_version(tmp_path, capsys, corpus, llm_server, command):
    data = paper_like(llm_server)
    data["annotate"]["prompt_version"] = "v9"
    config, out = write(tmp_path, data), tmp_path / "run"
    argv = {
        "check-config": ["check-config", config],
        "run": ["run", "--config", config, "--corpus", corpus, "--out", str(out)],
        "stage": ["stage", "ingest", "--config", config, "--corpus", corpus, "--out", str(out)],
    }[command]
    line = refused(capsys, argv, "annotate.prompt_version")
    assert "'v9' not found" in line and "v1" in line
    assert not out.exists()


def test_unset_api_key_variable(tmp_path, capsys, corpus, llm_server, monkeypatch):
    monkeypatch.delenv("MEGAPAIRS_TEST_UNSET_KEY", raising=False)
    config = write(tmp_path, paper_like(llm_server, api_key_env="MEGAPAIRS_TEST_UNSET_KEY"))
    out = tmp_path / "run"
    for argv in (["check-config", config], ["run", "--config", config, "--corpus", corpus, "--out", str(out)]):
        line = refused(capsys, argv, "annotate.describe.api_key_env")
        assert "MEGAPAIRS_TEST_UNSET_KEY" in line
    assert not out.exists()
    # A run that stops before annotate does not need the key.
    assert not [f for f in preflight(parse_config(yaml.safe_load(Path(config).read_text())), {"ingest", "embed"})]


def test_model_the_endpoint_does_not_serve(tmp_path, capsys, corpus, llm_server):
    llm_server.reset()
    config = write(tmp_path, paper_like(llm_server, model="OpenGVLab/InternVL2-26B"))
    out = tmp_path / "run"
    line = refused(capsys, ["run", "--config", config, "--corpus", corpus, "--out", str(out)], "annotate.describe.model")
    assert "does not serve 'OpenGVLab/InternVL2-26B'" in line and "fake-mllm" in line
    assert not out.exists() and llm_server.chat_requests() == []


def test_rejected_credentials(tmp_path, capsys, llm_server, monkeypatch):
    llm_server.reset()
    llm_server.api_key = "the-right-key"
    monkeypatch.setenv("MEGAPAIRS_TEST_WRONG_KEY", "a-wrong-key")
    config = write(tmp_path, paper_like(llm_server, api_key_env="MEGAPAIRS_TEST_WRONG_KEY"))
    line = refused(capsys, ["check-config", config], "annotate.describe.api_key_env")
    assert "rejected the credentials (HTTP 401)" in line and "a-wrong-key" not in line
    llm_server.reset()


def test_unreachable_endpoint_is_a_warning(tmp_path, capsys, caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["annotate"]["describe"] = {"backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1"}
    config = write(tmp_path, data)
    assert main(["check-config", config]) == 0
    assert "annotate.describe.base_url" in caplog.text and "did not answer" in caplog.text
    findings = preflight(parse_config(data))
    assert [(f.key, f.fatal) for f in findings] == [("annotate.describe.base_url", False)]


def test_a_served_model_passes(llm_server, monkeypatch):
    llm_server.reset()
    llm_server.api_key = "k"
    monkeypatch.setenv("MEGAPAIRS_TEST_KEY", "k")
    data = paper_like(llm_server, api_key_env="MEGAPAIRS_TEST_KEY")
    assert [f.key for f in preflight(parse_config(data))] == ["annotate.instruct.api_key_env"]  # no key: 401
    data["annotate"]["instruct"]["api_key_env"] = "MEGAPAIRS_TEST_KEY"
    llm_server.requests.clear()
    assert preflight(parse_config(data)) == []
    # Both steps share the endpoint: it is asked once.
    assert len([r for r in llm_server.requests if r.path.endswith("/models")]) == 1
    llm_server.reset()


def test_local_files_are_checked_only_for_the_stages_of_this_worker(tmp_path):
    """Loading a config touches no file it names; a missing model folder stops the stage that
    loads it, not ingest on a worker that does not have it (or the DAG's first task)."""
    missing = tmp_path / "no-such-clip"
    cfg = parse_config({"encoders": [{"name": "clip", "kind": "clip_image", "model": str(missing)},
                                     {"name": "colour", "kind": "classic_color_layout"}]})
    assert preflight(cfg, ["ingest"]) == []
    assert preflight(cfg, local_files=False) == []
    (finding,) = preflight(cfg, ["embed"])
    assert finding.fatal and finding.key == "encoders.0.model" and str(missing) in finding.message
    assert [f.key for f in preflight(cfg)] == ["encoders.0.model"]  # the CLI: one machine, every stage
