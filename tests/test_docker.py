"""docker/: the compose file, the Dockerfiles and .env.example, wired to each other and to the
project (no Docker engine here: the files are parsed and checked the way compose reads them)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from megapairs_ops.config import load_config
from megapairs_ops.deployment import deployment_settings, pool_specs
from tests.fixtures.paths import REPO

DOCKER = REPO / "docker"
AIRFLOW_SERVICES = {
    "airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
    "airflow-worker", "airflow-worker-gpu",
}
LONG_RUNNING = {"postgres", "redis", "vllm-mllm", "vllm-llm"} | AIRFLOW_SERVICES - {"airflow-init"}
GPU_SERVICES = {"airflow-worker-gpu", "vllm-mllm", "vllm-llm"}
# Variables compose itself reads from .env rather than the file's ${...} references.
COMPOSE_NATIVE = {"COMPOSE_PROFILES"}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; $$ is a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", ":?"):
            missing = not current
        else:
            missing = current is None
        if op and op.endswith("?") and missing:
            raise ValueError(f"{name}: {arg}")
        return arg if (op and op.endswith("-") and missing) else (current or "")

    parts = value.split("$$")
    return "$".join(VAR.sub(sub, p) for p in parts)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose file as the engine sees it with .env.example's defaults and the secrets filled in."""
    env = env_example()
    env.update({k: "x" for k, v in env.items() if not v and k not in ("MEGAPAIRS_MLLM_API_KEY", "MEGAPAIRS_LLM_API_KEY",
                                                                    "HF_TOKEN")})
    return interpolate(raw_compose, env)


@pytest.fixture(scope="module")
def paper():
    return load_config(REPO / "configs" / "megapairs.yaml")


def command_of(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in (DOCKER / name).read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    out = []
    for line in text.splitlines():
        if line.strip():
            instr, _, args = line.strip().partition(" ")
            out.append((instr.upper(), " ".join(args.split())))
    return out


def test_every_variable_compose_uses_is_in_env_example(raw_compose):
    text = (DOCKER / "docker-compose.yaml").read_text()
    used = {m.group(1) for m in VAR.finditer(text.replace("$$", ""))}
    defined = set(env_example())
    assert used - defined == set(), f"missing from docker/.env.example: {sorted(used - defined)}"
    assert defined - used - COMPOSE_NATIVE == set(), f"unused in the compose file: {sorted(defined - used)}"
    # Secrets have no defaults anywhere: compose refuses to start until docker/.env sets them.
    for secret in ("AIRFLOW_FERNET_KEY", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD",
                   "AIRFLOW_ADMIN_PASSWORD"):
        assert env_example()[secret] == ""
        assert re.search(r"\$\{" + secret + r":\?", text), secret
    with pytest.raises(ValueError, match="AIRFLOW_FERNET_KEY"):
        interpolate(raw_compose, env_example())
    # Without a docker/.env entry, compose's own default applies: the same value as the example's.
    for m in VAR.finditer(text):
        if m.group(2) == ":-":
            assert m.group(3) == env_example()[m.group(1)], f"{m.group(1)}: compose default differs from .env.example"


def test_services_images_and_builds(compose):
    services = compose["services"]
    assert set(services) == AIRFLOW_SERVICES | {"postgres", "redis", "vllm-mllm", "vllm-llm"}
    for name in AIRFLOW_SERVICES:
        build = services[name]["build"]
        assert (DOCKER / build["context"]).resolve() == REPO, name
        expected = "docker/Dockerfile.gpu" if name == "airflow-worker-gpu" else "docker/Dockerfile"
        assert build["dockerfile"] == expected and (REPO / expected).is_file(), name
        assert services[name]["image"].startswith("megapairs-airflow-gpu" if "gpu" in name else "megapairs-airflow:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    vllm_pin = re.search(r"^vllm==(\S+)$", (REPO / "requirements-gpu.txt").read_text(), re.M).group(1)
    for name in ("vllm-mllm", "vllm-llm"):
        assert services[name]["image"] == f"vllm/vllm-openai:v{vllm_pin}", "vLLM server and GPU image pin differ"


def test_airflow_services_run_celery_on_postgres_and_redis(compose):
    services = compose["services"]
    pg_env = services["postgres"]["environment"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379, name
        for key, scheme in (("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql+psycopg2"),
                            ("AIRFLOW__CELERY__RESULT_BACKEND", "db+postgresql")):
            url = urlsplit(env[key])
            assert (url.scheme, url.hostname, url.port) == (scheme, "postgres", 5432), (name, key)
            assert (url.username, url.password, url.path.lstrip("/")) == (
                pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"]), (name, key)
        api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert api.hostname == "airflow-api-server" and api.path == "/execution/", name
        assert str(api.port) == option(command_of(services["airflow-api-server"]), "--port")
        for shared in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
            assert env[shared] == services["airflow-scheduler"]["environment"][shared], (name, shared)
        assert env["MEGAPAIRS_OUTPUT_ROOT"] == "/data/runs" and env["MEGAPAIRS_CORPUS"] == "/data/corpus"
        assert env["MEGAPAIRS_CONFIG"] == "/opt/megapairs/configs/megapairs.yaml"
    assert "6379" not in str(services["redis"].get("ports", "")), "the broker is not published to the host"


def test_commands_and_queues(compose, paper):
    services = compose["services"]
    assert command_of(services["airflow-api-server"])[0] == "api-server"
    for name, first in [("airflow-scheduler", "scheduler"), ("airflow-dag-processor", "dag-processor"),
                        ("airflow-triggerer", "triggerer")]:
        assert command_of(services[name]) == [first], name
    cpu, gpu = command_of(services["airflow-worker"]), command_of(services["airflow-worker-gpu"])
    assert cpu[:2] == gpu[:2] == ["celery", "worker"]
    assert option(cpu, "--queues") == "default"  # Airflow's default queue: every task not routed elsewhere
    assert option(gpu, "--queues") == "gpu" == paper.resources.gpu_queue
    settings = deployment_settings({"MEGAPAIRS_CONFIG": str(REPO / "configs" / "megapairs.yaml")})
    assert settings.gpu_queue == "gpu"
    # The Dockerfiles' entrypoint is `airflow`, which the commands above are arguments of.
    for name in ("Dockerfile", "Dockerfile.gpu"):
        (entrypoint,) = [json.loads(a) for i, a in dockerfile(name) if i == "ENTRYPOINT"]
        assert entrypoint[-1] == "airflow", name


def test_init_migrates_creates_pools_and_the_admin(compose, paper):
    init = compose["services"]["airflow-init"]
    script = "\n".join(command_of(init)) if init["entrypoint"][-1] != "-c" else command_of(init)[0]
    assert init["entrypoint"] == ["/bin/bash", "-c"]
    assert "airflow db migrate" in script
    assert 'megapairs airflow-pools --config "$MEGAPAIRS_CONFIG"' in script
    # What that command creates for the paper profile: the pools the DAG routes to.
    assert {name for name, _, _ in pool_specs(paper.resources)} == {"gpu", "llm"}
    assert (paper.resources.gpu_pool, paper.resources.llm_pool) == ("gpu", "llm")
    passwords = init["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert f"> {passwords}" in script
    assert init["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].endswith(":admin")
    assert init["restart"] == "no" and "healthcheck" not in init
    # The config path the services use exists in the image (configs/ is copied to /opt/megapairs).
    config_in_image = Path(init["environment"]["MEGAPAIRS_CONFIG"])
    assert (REPO / config_in_image.relative_to("/opt/megapairs")).is_file()


def test_gpu_reservations(compose):
    ids = []
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name not in GPU_SERVICES:
            assert not devices, name
            continue
        (device,) = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert service.get("profiles") == ["gpu"], name
        ids += device["device_ids"]
    assert len(ids) == len(set(ids)) == 3, "each GPU service gets its own GPU by default"


def test_health_checks_and_start_order(compose):
    services = compose["services"]
    for name in LONG_RUNNING:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    assert "inspect ping" in services["airflow-worker-gpu"]["healthcheck"]["test"][1]
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    for name in ("airflow-worker", "airflow-worker-gpu"):
        assert services[name]["depends_on"]["airflow-api-server"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)


def test_volumes(compose):
    services, declared = compose["services"], set(compose["volumes"])

    def mounts(name):
        return {v.split(":")[1]: v.split(":")[0] for v in services[name].get("volumes", [])}

    for name, service in services.items():
        for source in mounts(name).values():
            assert source.startswith((".", "/")) or source in declared, (name, source)
    for name in AIRFLOW_SERVICES:
        m = mounts(name)
        assert m["/data"] == mounts("airflow-worker")["/data"], "all workers share the run directories"
        assert m["/opt/airflow/logs"] == "airflow-logs" and m["/opt/airflow/auth"] == "airflow-auth", name
    assert mounts("postgres")["/var/lib/postgresql/data"] == "postgres-db"
    for name in ("vllm-mllm", "vllm-llm"):
        m = mounts(name)
        assert m["/root/.cache/huggingface"] in declared and "/models" in m, name


@pytest.mark.parametrize("step", ["describe", "instruct"])
def test_vllm_servers_serve_what_the_paper_profile_calls(compose, paper, step):
    cfg = getattr(paper.annotate, step)
    url = urlsplit(cfg.base_url)
    service = compose["services"][url.hostname]  # the config's host is the compose service
    args = command_of(service)
    assert option(args, "--port") == str(url.port) and url.path == "/v1"
    assert option(args, "--served-model-name") == cfg.model
    assert option(args, "--model") == cfg.model  # the hub id by default; a /models path works too
    assert service["environment"]["VLLM_API_KEY"] == compose["services"]["airflow-worker"]["environment"][
        cfg.api_key_env]
    if step == "describe":
        assert "--trust-remote-code" in args
        assert json.loads(option(args, "--limit-mm-per-prompt"))["image"] >= 2  # query and target together
    raw_args = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())["services"][url.hostname]["command"]
    assert any(str(a).startswith("${MEGAPAIRS_") and str(a).endswith(f":-{cfg.model}}}") for a in raw_args)


def test_cpu_dockerfile():
    steps = dockerfile("Dockerfile")
    args = {a.split("=")[0]: a.split("=", 1)[1] for i, a in steps if i == "ARG" and "=" in a}
    froms = [a.split()[0].replace("${PYTHON_IMAGE}", args["PYTHON_IMAGE"]) for i, a in steps if i == "FROM"]
    assert froms and all(f.startswith("python:3.11") for f in froms)
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert "-r /tmp/requirements.txt -c /tmp/requirements.lock" in runs and "whl/cpu" in runs
    _check_project_layout(steps)


def test_gpu_dockerfile():
    steps = dockerfile("Dockerfile.gpu")
    cuda = [a for i, a in steps if i == "ARG" and a.startswith("CUDA_IMAGE=")][0].split("=", 1)[1]
    assert re.match(r"nvidia/cuda:12\.[\d.]+-.*runtime", cuda)
    assert any(i == "ARG" and a.startswith("INSTALL_VLLM=") for i, a in steps)
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert "python3.11 -m venv" in runs
    assert "^(faiss-gpu-cu12|open_clip_torch|timm|ftfy)==" in runs and "^vllm==" in runs and "'^faiss-cpu=='" in runs
    assert "^torchvision==" in runs and "import faiss, torch, open_clip" in runs
    assert "-c /tmp/constraints.txt" in runs
    gpu_reqs = (REPO / "requirements-gpu.txt").read_text()
    for package in ("faiss-gpu-cu12", "vllm", "open_clip_torch", "timm", "ftfy", "torchvision"):
        assert re.search(rf"^{package}==", gpu_reqs, re.M), package
    # The CPU test pass installs the same open_clip pins as the GPU image.
    cpu_test = (REPO / "requirements-open-clip-test.txt").read_text()
    for pin in re.findall(r"^(?:open_clip_torch|timm|ftfy|torchvision)==\S+$", cpu_test, re.M):
        assert re.search(rf"^{re.escape(pin)}$", gpu_reqs, re.M), pin
    _check_project_layout(steps)


def _check_project_layout(steps):
    """The paths the image's ENV promises are where COPY puts the project, and COPY sources exist."""
    env = {}
    for i, a in steps:
        if i == "ENV":
            env.update(dict(re.findall(r"(\S+?)=(\S+)", a)))
    (workdir,) = {a for i, a in steps if i == "WORKDIR"}
    copied = {}
    for i, a in steps:
        if i == "COPY" and not a.startswith("--from"):
            *sources, dest = a.split()
            for source in sources:
                assert (REPO / source).exists(), source
            copied.update({source: dest for source in sources})
    for package in ("megapairs_ops", "dags", "plugins", "sql", "configs"):
        assert copied[package] == f"./{package}", package
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == f"{workdir}/dags"
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == f"{workdir}/plugins"
    assert env["MEGAPAIRS_SQL_DIR"] == f"{workdir}/sql"
    assert workdir == "/opt/megapairs"
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image does not run as root"
