"""docker-compose.yml and the Dockerfiles: structure always, `docker compose config` where it exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool


def pins(path) -> dict[str, str]:
    found = {}
    for line in (REPO_ROOT / path).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#]+)", line)
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(3)
    return found


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_triton_reserves_gpus_mounts_the_repository_and_has_a_health_check(compose):
    triton = compose["services"]["triton"]
    [device] = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "./model_repository:/models" in triton["volumes"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert "--model-control-mode=explicit" in " ".join(triton["command"])
    # The gateway's keepalive pings must not get its connection closed (see GRPC_KEEPALIVE_FLAGS).
    from vlm_serving.deploy.triton_server import GRPC_KEEPALIVE_FLAGS

    assert all(flag in " ".join(triton["command"]) for flag in GRPC_KEEPALIVE_FLAGS)


def test_gateway_waits_for_a_healthy_triton_and_needs_keys(compose):
    gateway = compose["services"]["gateway"]
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    # Every replica of `--scale triton=N` through the service name, re-resolved.
    assert gateway["environment"]["VLM_TRITON_URL"] == "dns:///triton:8001"
    assert "ports" not in compose["services"]["triton"], "published ports would keep triton from scaling"
    assert float(gateway["environment"]["VLM_DRAIN_GRACE_S"]) < float(gateway["stop_grace_period"].rstrip("s"))
    assert ":?" in gateway["environment"]["VLM_API_KEYS"], "compose must refuse to start without API keys"
    assert "gateway.healthcheck" in " ".join(gateway["healthcheck"]["test"])


def test_published_ports_are_loopback_only(compose):
    for service in compose["services"].values():
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", []))


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/triton.Dockerfile"])
def test_dockerfiles_copy_only_what_exists(dockerfile):
    text = (REPO_ROOT / dockerfile).read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), f"{dockerfile}: {source} does not exist"
    if "triton" in dockerfile:
        assert "nvcr.io/nvidia/tritonserver" in text


@pytest.mark.parametrize("image_requirements", ["requirements-gateway.txt", "requirements-triton.txt"])
def test_container_pins_agree_with_the_development_pins(image_requirements):
    development = pins("requirements.txt")
    for name, version in pins(image_requirements).items():
        if name in development:
            assert development[name] == version, f"{image_requirements}: {name}=={version} but requirements.txt pins {development[name]}"


def _compose_command():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_validates():
    require_tool(_compose_command() is not None, "neither docker-compose nor the docker compose plugin is installed")
    env = dict(os.environ, VLM_API_KEYS="test-key")
    result = subprocess.run([*_compose_command(), "config", "--quiet"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_gateway_image_holds_every_module_the_gateway_imports(tmp_path):
    """Only what the Dockerfile copies of vlm_serving (with gateway/ and the generated protos),
    imported by a fresh interpreter: a module the gateway needs and the image lacks fails here."""
    app = tmp_path / "app"
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY vlm_serving/"):
            *sources, target = line.split()[1:]
            (app / target).mkdir(parents=True, exist_ok=True)
            for source in sources:
                shutil.copy(REPO_ROOT / source, app / target)
    shutil.copytree(REPO_ROOT / "gateway", app / "gateway")
    # The checkout's editable install would serve any module the image lacks: drop its finder.
    probe = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
             "getattr(f, '__module__', '')]; import gateway.server, gateway.admin, gateway.healthcheck, vlm_serving; "
             "print(vlm_serving.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=app, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=f"{app}{os.pathsep}{REPO_ROOT / 'build' / 'gen'}"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith(str(app)), "the probe must import the image's copy, not the checkout"
