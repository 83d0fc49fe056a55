"""`pip install .` gives a working `megapairs`: the wheel carries every package, the SQL files
and the prompt sets, and its pins agree with requirements.txt. The slow test installs the wheel
into a fresh venv outside the repository and runs the demo profile there."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from megapairs_ops.cli import main
from tests.fixtures.paths import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.split("[")[0].lower()] = version
    return pins


def test_the_package_list_is_every_folder_of_the_source_tree():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    tree = {
        ".".join(path.relative_to(REPO).parts)
        for path in [REPO / "megapairs_ops", *(REPO / "megapairs_ops").rglob("*")]
        if path.is_dir() and path.name != "__pycache__"
    }
    assert listed == tree | {"megapairs_ops.sql"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"megapairs_ops.sql": "sql"}


def test_declared_dependencies_are_pinned_as_in_requirements_txt():
    required = _pins((REPO / "requirements.txt").read_text().splitlines())
    project = PYPROJECT["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["deploy"])
    assert all("==" in d for d in project["dependencies"])
    assert {name: required.get(name) for name in declared} == declared
    # Everything requirements.txt installs is declared, except the test runner.
    assert set(required) - set(declared) == {"pytest"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("wheel-build")
    src = build / "src"
    # A copy, so the build's own folders (build/, *.egg-info) never land in the checkout.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".airflow", "runs", "data", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("megapairs_ops-*.whl")
    return whl


@pytest.mark.slow
def test_the_wheel_carries_the_sql_files_and_prompts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_sql = {n.removeprefix("megapairs_ops/sql/") for n in names if n.startswith("megapairs_ops/sql/")}
    assert shipped_sql == {p.name for p in (REPO / "sql").glob("*.sql")} | {"__init__.py"}
    prompts = REPO / "megapairs_ops" / "prompts"
    assert {n for n in names if n.startswith("megapairs_ops/prompts/")} == {
        str(p.relative_to(REPO)) for p in prompts.rglob("*") if p.is_file()}
    assert not any(n.startswith(("tests/", "dags/", "bench/")) for n in names)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_profile_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    # The dependencies come from this environment (no download): a path line appends its
    # site-packages, whose own .pth files (this checkout's editable install) are not run.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "repo_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"
    work.mkdir()
    config = work / "demo.yaml"
    shutil.copy(REPO / "configs" / "demo.yaml", config)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGAPAIRS_SQL_DIR")}

    def megapairs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "megapairs"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.run([str(python), "-c", "import megapairs_ops, megapairs_ops.db as d; "
                            "print(megapairs_ops.__file__); print(d._sql_dir().joinpath('count_triplets.sql'))"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the installed copy, its own SQL

    assert megapairs("sample-corpus", "corpus", "--n", "40", "--seed", "5").returncode == 0
    done = megapairs("run", "--config", str(config), "--corpus", "corpus", "--out", "run", "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]

    # The same triplets as this checkout's code on the same corpus.
    reference = tmp_path / "reference" / "run"  # the same run name: run_id is part of a triplet
    assert main(["run", "--config", str(config), "--corpus", str(work / "corpus"), "--out", str(reference)]) == 0
    digest = [hashlib.sha256((d / "triplets.jsonl").read_bytes()).hexdigest() for d in (work / "run", reference)]
    assert digest[0] == digest[1] and (work / "run" / "triplets.jsonl").stat().st_size > 0


def test_the_development_install_finds_the_sql_package_outside_the_checkout(tmp_path):
    """`make` installs the checkout in editable mode: megapairs_ops.sql maps to sql/ there too."""
    code = "import importlib.resources as r; print(r.files('megapairs_ops.sql').joinpath('count_triplets.sql'))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGAPAIRS_SQL_DIR")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.strip()
    assert Path(out) == REPO / "sql" / "count_triplets.sql"
