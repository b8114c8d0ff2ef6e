"""The container files, checked without a Docker engine: they parse, wire the services as the
README says, and name files and commands that exist; the entrypoint's commands run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.__main__ import build_parser
from service.models.spec import load_config

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def run_entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        env={**os.environ, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def subcommands() -> set[str]:
    parser = build_parser()
    return set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------
def test_compose_has_redis_api_and_a_gpu_worker_wired_to_celery(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker"}
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["SALIENCY_JOBS_BACKEND"] == "celery"
        assert re.fullmatch(r"redis://redis:6379/\d+", env["SALIENCY_BROKER_URL"])
        assert int(env["SALIENCY_JOB_VISIBILITY_TIMEOUT_S"]) > int(env["SALIENCY_JOB_LEASE_S"])
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["build"]["context"] == "."
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker"]["environment"]["SALIENCY_DEVICE"] == "cuda"
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert services["api"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert "container_name" not in services["worker"]  # `--scale worker=N` needs generated names
    assert services["api"]["ports"] == ["8000:8000"]


def test_every_service_has_a_healthcheck_that_runs_an_existing_command(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["api"]["healthcheck"]["test"] == ["CMD", "saliency-entrypoint", "healthcheck", "api"]
    assert services["worker"]["healthcheck"]["test"] == [
        "CMD",
        "saliency-entrypoint",
        "healthcheck",
        "worker",
    ]
    roles = {services[name]["command"][0] for name in ("api", "worker")}
    assert roles == {"serve", "worker"} <= subcommands()


def test_mounted_files_exist_and_the_model_config_loads(compose: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        for volume in compose["services"][name]["volumes"]:
            source, target, *_ = volume.split(":")
            assert (ROOT / source).is_file(), source
            assert target == compose["x-saliency-env"]["SALIENCY_MODELS_CONFIG"]
    specs = load_config(ROOT / "docker" / "models.toml")
    assert [s.name for s in specs] == ["efficientnet_lite0"]


def test_dockerfile_runs_as_non_root_with_a_readiness_healthcheck(dockerfile: str) -> None:
    lines = [line.strip() for line in dockerfile.splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users == ["saliency"]
    assert any(line.startswith("RUN useradd") and "saliency" in line for line in lines)
    assert "HEALTHCHECK" in dockerfile and '"healthcheck", "api"' in dockerfile
    assert "ARG TORCH_VARIANT=cpu" in lines  # CPU by default, CUDA by build argument
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in dockerfile
    assert 'ENTRYPOINT ["saliency-entrypoint"]' in lines and 'CMD ["serve"]' in lines
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    # the build context keeps what the COPY lines need
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"service", "client", "docker", "pyproject.toml", "README.md"} & set(ignored)


def test_entrypoint_help_and_its_commands_run() -> None:
    out = run_entrypoint("--help")
    assert out.returncode == 0 and "serve" in out.stdout and "worker" in out.stdout
    serve = run_entrypoint("serve", "--help")
    assert serve.returncode == 0 and "--port" in serve.stdout
    worker = run_entrypoint("worker", "--help", SALIENCY_JOBS_BACKEND="celery")
    assert worker.returncode == 0 and "Celery" in worker.stdout
    refused = run_entrypoint("worker", SALIENCY_JOBS_BACKEND="local")
    assert refused.returncode == 2 and "SALIENCY_JOBS_BACKEND=celery" in refused.stderr
    down = run_entrypoint("healthcheck", "api", "--url", "http://127.0.0.1:9/readyz", "--timeout", "1")
    assert down.returncode == 1
    other = run_entrypoint("echo", "hello")
    assert other.returncode == 0 and other.stdout.strip() == "hello"


def test_entrypoint_openapi_documents_the_job_routes() -> None:
    out = run_entrypoint("openapi", SALIENCY_WARMUP="false")
    assert out.returncode == 0, out.stderr
    assert '"/v1/jobs/{job_id}/result"' in out.stdout


def test_containers_log_json_and_a_terminal_text(compose: dict[str, Any], dockerfile: str) -> None:
    from service.config import Settings

    assert re.search(r"^\s+SALIENCY_LOG_FORMAT=json\b", dockerfile, re.M)
    for name in ("api", "worker"):
        fmt = compose["services"][name]["environment"]["SALIENCY_LOG_FORMAT"]
        assert Settings(log_format=fmt).log_format == "json"
    assert Settings.model_fields["log_format"].default == "text"
