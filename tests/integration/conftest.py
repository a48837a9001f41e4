"""A real Triton server on a freshly rendered copy of the model repository (CPU profile)."""

from __future__ import annotations

import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vlm_serving.deploy.render import PROFILES, render_repository
from vlm_serving.deploy.triton_server import TritonServer

pytestmark = pytest.mark.integration


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def make_repository(directory: Path, checkpoints: Path, **profile_changes) -> Path:
    """The committed model folders (model.py files) with configs rendered for the CPU profile."""
    shutil.copytree(REPO_ROOT / "model_repository", directory, ignore=shutil.ignore_patterns("config.pbtxt"))
    render_repository(directory, replace(PROFILES["cpu"], checkpoints_dir=checkpoints, **profile_changes))
    return directory


def start_server(directory: Path, **options) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    server = TritonServer(
        repository=directory, http_port=http, grpc_port=grpc, metrics_port=metrics,
        log_path=directory.parent / f"{directory.name}.log", **options,
    )
    server.start()
    try:
        server.wait_ready(timeout=240)
    except Exception:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def triton(tmp_path_factory, checkpoints):
    repository = make_repository(tmp_path_factory.mktemp("triton") / "model_repository", checkpoints)
    server = start_server(repository)
    yield server
    server.stop()
