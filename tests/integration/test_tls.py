"""TLS and mutual TLS on a real gateway's gRPC and HTTP listeners (issue 28, item 1): certificates made
here, clients that trust the gateway's authority are answered, others refused, and a certificate replaced
on disk is what the next connection gets, with no restart."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vlm_client import VLMClient

from tests.certificates import Authority, common_name
from tests.integration.conftest import KEY, start_gateway

pytestmark = pytest.mark.integration
ASK = {"model": "qwen2.5-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "Say hi"}]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The gateway's authority and certificate, and a client authority with one client's certificate."""
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca = Authority("server-ca", directory), Authority("client-ca", directory)
    server_ca.issue("gateway-1", directory / "server.pem", directory / "server.key")
    client_ca.issue("client-1", directory / "client.pem", directory / "client.key")
    return {"server_ca": server_ca, "client_ca": client_ca, "dir": directory,
            "cert": directory / "server.pem", "key": directory / "server.key",
            "client_cert": directory / "client.pem", "client_key": directory / "client.key"}


def channel_credentials(pki, client_certificate: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        pki["server_ca"].path.read_bytes(),
        pki["client_key"].read_bytes() if client_certificate else None,
        pki["client_cert"].read_bytes() if client_certificate else None)


@pytest.fixture(scope="module")
def tls_gateway(triton, pki, tmp_path_factory):
    """One gateway with mutual TLS on both listeners: the client authority's certificates are required."""
    gateway = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("tls-gateway"),
                            credentials=channel_credentials(pki),
                            VLM_TLS_CERT_FILE=str(pki["cert"]), VLM_TLS_KEY_FILE=str(pki["key"]),
                            VLM_TLS_CLIENT_CA_FILE=str(pki["client_ca"].path))
    yield gateway
    gateway.stop()


def https_client(gateway, pki, client_certificate: bool = True, trust=None) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=str(trust or pki["server_ca"].path))
    if client_certificate:
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
    return openai.OpenAI(base_url=f"https://{gateway.http_address}/v1", api_key=KEY, max_retries=0, timeout=60,
                         http_client=httpx.Client(verify=context))


def health(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def peer_certificate(address: str, pki, alpn: str) -> str:
    """The common name of the certificate a fresh connection to `address` is shown."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki["server_ca"].path))
    context.load_cert_chain(pki["client_cert"], pki["client_key"])
    context.set_alpn_protocols([alpn])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return common_name(tls.getpeercert(binary_form=True))


def test_the_cli_and_sdk_with_the_authority_and_a_client_certificate_are_answered_over_grpc(tls_gateway, pki, monkeypatch):
    result = subprocess.run(
        [sys.executable, "-m", "vlm_client.cli", "--address", tls_gateway.address, "--ca-file", pki["server_ca"].path,
         "--cert-file", pki["client_cert"], "--key-file", pki["client_key"],
         "generate", "Say hi", "--model", "qwen2.5-vl", "--max-tokens", "4"],
        env={**os.environ, "VLM_API_KEY": KEY}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    # The SDK reads the same files from the environment.
    monkeypatch.setenv("VLM_CA_FILE", str(pki["server_ca"].path))
    monkeypatch.setenv("VLM_CERT_FILE", str(pki["client_cert"]))
    monkeypatch.setenv("VLM_KEY_FILE", str(pki["client_key"]))
    with VLMClient(tls_gateway.address, api_key=KEY) as client:
        reply = client.generate("qwen2.5-vl", "Say hi", max_tokens=4)
    assert reply.usage.completion_tokens > 0


def test_the_openai_sdk_with_the_authority_and_a_client_certificate_is_answered_over_https(tls_gateway, pki):
    with https_client(tls_gateway, pki) as client:
        assert client.chat.completions.create(**ASK).usage.completion_tokens > 0


def test_a_client_that_does_not_trust_the_gateways_authority_is_refused(tls_gateway, pki):
    stranger = Authority("stranger-ca", pki["dir"])
    untrusting = grpc.ssl_channel_credentials(stranger.path.read_bytes(), pki["client_key"].read_bytes(),
                                              pki["client_cert"].read_bytes())
    with pytest.raises(grpc.RpcError) as refused:
        health(tls_gateway.address, untrusting)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with https_client(tls_gateway, pki, trust=stranger.path) as client, \
            pytest.raises(openai.APIConnectionError) as refused_http:
        client.chat.completions.create(**ASK)
    assert "CERTIFICATE_VERIFY_FAILED" in repr(refused_http.value.__cause__)
    # Nor does plain text reach a TLS listener.
    with pytest.raises(grpc.RpcError) as plain:
        health(tls_gateway.address, None)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate_from_the_client_authority(tls_gateway, pki):
    with pytest.raises(grpc.RpcError) as refused:
        health(tls_gateway.address, channel_credentials(pki, client_certificate=False))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with https_client(tls_gateway, pki, client_certificate=False) as client, pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(**ASK)
    # A certificate from another authority is no better than none.
    impostor = Authority("impostor-ca", pki["dir"])
    impostor.issue("client-2", pki["dir"] / "impostor.pem", pki["dir"] / "impostor.key")
    forged = grpc.ssl_channel_credentials(pki["server_ca"].path.read_bytes(),
                                          (pki["dir"] / "impostor.key").read_bytes(),
                                          (pki["dir"] / "impostor.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as refused:
        health(tls_gateway.address, forged)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health(tls_gateway.address, channel_credentials(pki)) == health_pb2.HealthCheckResponse.SERVING


def test_a_replaced_certificate_is_served_to_new_connections_without_a_restart(tls_gateway, pki):
    assert peer_certificate(tls_gateway.address, pki, "h2") == "gateway-1"
    assert peer_certificate(tls_gateway.http_address, pki, "http/1.1") == "gateway-1"
    before = tls_gateway.process.pid
    context = ssl.create_default_context(cafile=str(pki["server_ca"].path))
    context.load_cert_chain(pki["client_cert"], pki["client_key"])
    with httpx.Client(verify=context) as kept_open:
        assert kept_open.get(f"https://{tls_gateway.http_address}/health").status_code == 200

        pki["server_ca"].issue("gateway-2", pki["cert"], pki["key"])

        assert peer_certificate(tls_gateway.address, pki, "h2") == "gateway-2"
        assert peer_certificate(tls_gateway.http_address, pki, "http/1.1") == "gateway-2"
        with https_client(tls_gateway, pki) as client:
            assert client.chat.completions.create(**ASK).usage.completion_tokens > 0
        # The connection opened before the rotation keeps working, on the certificate it was shown.
        again = kept_open.get(f"https://{tls_gateway.http_address}/health")
        assert again.status_code == 200
        shown = again.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
        assert common_name(shown) == "gateway-1"
    assert tls_gateway.process.pid == before and tls_gateway.process.poll() is None


def test_plain_text_stays_the_default(gateway):
    assert health(gateway.address, None) == health_pb2.HealthCheckResponse.SERVING
    with openai.OpenAI(base_url=f"http://{gateway.http_address}/v1", api_key=KEY, max_retries=0, timeout=60) as plain:
        assert plain.chat.completions.create(**ASK).usage.completion_tokens > 0


def test_the_web_ui_passes_its_tls_flags_to_its_client(tls_gateway, pki, monkeypatch):
    from vlm_client.webui import app

    built = []

    class Page:  # the page itself is not served here: its client is what the flags reach
        def queue(self, **_):
            pass

        def launch(self, **_):
            pass

    monkeypatch.setattr(app, "build", lambda ui: built.append(ui) or Page())
    monkeypatch.setenv("VLM_API_KEY", KEY)
    assert app.main(["--address", tls_gateway.address, "--ca-file", str(pki["server_ca"].path),
                     "--cert-file", str(pki["client_cert"]), "--key-file", str(pki["client_key"])]) == 0
    [ui] = built
    try:
        menu, note = ui.models()  # the note says why when the gateway could not be reached
        assert note == "" and "qwen2.5-vl" in menu["choices"]
    finally:
        ui.client.close()
