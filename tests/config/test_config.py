from pathlib import Path

import pytest
import yaml

from megapairs_ops.cli import main
from megapairs_ops.config import ConfigError, load_config, parse_config
from tests.fixtures.paths import REPO

MINIMAL = {"encoders": [{"name": "sem", "kind": "classic_color_layout"}]}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("profile", ["demo.yaml", "megapairs.yaml"])
def test_shipped_profiles_load(profile):
    cfg = load_config(REPO / "configs" / profile)
    assert len(cfg.encoders) == 3
    assert all(e.band == (0.8, 0.96) for e in cfg.encoders)
    assert cfg.mining.n_hard_negatives == 5


def test_paper_profile_names_the_paper_models():
    cfg = load_config(REPO / "configs" / "megapairs.yaml")
    assert {e.kind for e in cfg.encoders} == {"clip_image", "dinov2", "clip_text"}
    assert "InternVL2-26B" in cfg.annotate.describe.model
    assert "Llama-3-8B" in cfg.annotate.instruct.model
    assert cfg.annotate.word_num == (60, 100)


@pytest.mark.parametrize(
    "mutate, key, words",
    [
        (lambda d: d.update(bogus=1), "bogus", "unknown key"),
        (lambda d: d["encoders"][0].update(band=[0.96, 0.8]), "encoders.0.band", "lo"),
        (lambda d: d["encoders"][0].update(batch_size="many"), "encoders.0.batch_size", "integer"),
        (lambda d: d["encoders"][0].update(kind="clip_image"), "encoders.0", "needs 'model'"),
        (lambda d: d.update(mining={"k": 2, "max_targets_per_query": 5}), "mining", "k (2)"),
        (lambda d: d.update(annotate={"describe": {"backend": "openai", "model": "m"}}), "annotate.describe", "base_url"),
        (lambda d: d.update(encoders=[]), "encoders", "at least 1"),
        (lambda d: d["encoders"].append(dict(d["encoders"][0])), "encoders", "unique"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, mutate, key, words):
    data = {"encoders": [dict(e) for e in MINIMAL["encoders"]]}
    mutate(data)
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    message = str(err.value)
    assert "\n" not in message
    assert f": {key}:" in message
    assert words in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoders: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_exits_nonzero_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, {"encoders": [{"name": "x", "kind": "classic_texture", "band": [0.9, 0.1]}]})
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoders.0.band" in err


def test_fingerprint_tracks_content():
    a = parse_config(MINIMAL)
    b = parse_config({"encoders": [{"name": "sem", "kind": "classic_color_layout", "band": [0.7, 0.9]}]})
    assert a.section_fingerprint(a.encoders[0]) == a.section_fingerprint(a.encoders[0])
    assert a.section_fingerprint(a.encoders[0]) != b.section_fingerprint(b.encoders[0])
