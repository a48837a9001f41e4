"""A real Triton server on a freshly rendered copy of the model repository (CPU profile)."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, encode, http_host, picture, serving_file
from vlm_serving.deploy.render import PROFILES, copy_model_code, render_repository
from vlm_serving.deploy.stack import GatewayProcess
from vlm_serving.deploy.triton_server import TritonServer

pytestmark = pytest.mark.integration
KEY = "e2e-key"
PNG = encode(picture(120, 90, seed=3))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def make_repository(directory: Path, checkpoints: Path, source: Path = REPO_ROOT / "model_repository",
                    **profile_changes) -> Path:
    """The committed model folders (each model's version 1, as tracked) with configs rendered for the
    CPU profile. Version folders a user shipped into the working tree (docs/operations.md: Updating models) and
    hand-edited configs stay out: the tests never depend on the working tree's state."""
    copy_model_code(source, directory)
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
    except BaseException:  # Ctrl-C too: never leave a server behind
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def triton(tmp_path_factory, checkpoints):
    repository = make_repository(tmp_path_factory.mktemp("triton") / "model_repository", checkpoints)
    server = start_server(repository)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_host():
    with http_host(serving_file(PNG)) as host:
        yield host


def start_gateway(triton_url: str, log_dir, credentials=None, **env) -> GatewayProcess:
    port, metrics, http = free_ports(3)
    gateway = GatewayProcess(
        triton_url=triton_url, address=f"127.0.0.1:{port}", metrics_port=metrics, log_path=log_dir / "gateway.log",
        http_address=f"127.0.0.1:{http}",
        # Answers left unbounded stop at 64 tokens: the tiny random-weight models rarely end theirs
        # (tests of the unbounded default set VLM_DEFAULT_MAX_TOKENS="").
        extra_env={"VLM_API_KEYS": KEY, "VLM_HEALTH_POLL_S": "0.5", "VLM_METRICS_ADDRESS": "127.0.0.1",
                   "VLM_DEFAULT_MAX_TOKENS": "64", **env},
        credentials=credentials,  # the gateway's TLS, if env sets it
    )
    gateway.start()
    try:
        gateway.wait_serving(60)
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.fixture(scope="session")
def gateway(triton, image_host, tmp_path_factory):
    # The image host is on loopback, which image URLs may reach only when allowed; a 1 s keepalive
    # shows that Triton (started with GRPC_KEEPALIVE_FLAGS) never closes the gateway's connection for it.
    gateway = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway"),
                            VLM_MAX_IMAGE_BYTES="300000", VLM_IMAGE_URL_ALLOWLIST=image_host,
                            VLM_IMAGE_URL_ALLOWED_NETWORKS="127.0.0.0/8", VLM_TRITON_KEEPALIVE_S="1")
    yield gateway
    gateway.stop()
