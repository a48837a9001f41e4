"""TLS settings, the listeners' reloading certificates (gateway/tls.py) and TLS to Triton, in process."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.settings import Settings, SettingsError
from gateway.tls import CertificateFiles, channel_credentials
from gateway.triton_backend import TritonBackend
from tests.certificates import Authority, common_name
from tests.unit.gateway.fake_triton import start_fake_triton
from tests.unit.gateway.test_triton_stream import collect


@pytest.fixture
def pki(tmp_path):
    authority = Authority("test-ca", tmp_path)
    authority.issue("server-1", tmp_path / "server.pem", tmp_path / "server.key")
    return authority, tmp_path / "server.pem", tmp_path / "server.key"


def settings(**env) -> Settings:
    return Settings.from_env({"VLM_API_KEYS": "k", **env})


def test_tls_is_off_by_default_and_its_files_are_checked_by_name(pki):
    authority, cert, key = pki
    assert settings().tls_cert_file is None and settings().triton_tls_ca_file is None
    on = settings(VLM_TLS_CERT_FILE=str(cert), VLM_TLS_KEY_FILE=str(key), VLM_TLS_CLIENT_CA_FILE=str(authority.path))
    assert (on.tls_cert_file, on.tls_key_file, on.tls_client_ca_file) == (str(cert), str(key), str(authority.path))
    together = "VLM_TLS_CERT_FILE and VLM_TLS_KEY_FILE go together"
    refusals = [
        (together, {"VLM_TLS_CERT_FILE": str(cert)}),
        (together, {"VLM_TLS_KEY_FILE": str(key)}),
        ("VLM_TLS_CERT_FILE='/no/such.pem' is not a file", {"VLM_TLS_CERT_FILE": "/no/such.pem",
                                                            "VLM_TLS_KEY_FILE": str(key)}),
        ("VLM_TLS_CLIENT_CA_FILE (mutual TLS) needs TLS", {"VLM_TLS_CLIENT_CA_FILE": str(authority.path)}),
        ("VLM_TRITON_TLS_CERT_FILE needs VLM_TRITON_TLS_CA_FILE", {"VLM_TRITON_TLS_CERT_FILE": str(cert),
                                                                   "VLM_TRITON_TLS_KEY_FILE": str(key)}),
    ]
    for message, env in refusals:
        with pytest.raises(SettingsError, match=re.escape(message)):
            settings(**env)


def peer(port: int, authority: Authority, certificate=None) -> str:
    context = ssl.create_default_context(cafile=str(authority.path))
    if certificate:
        context.load_cert_chain(*certificate)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return common_name(tls.getpeercert(binary_form=True))


def serve_health(files: CertificateFiles, test):
    async def main():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", files.grpc_credentials())
        await server.start()
        try:
            await test(port)
        finally:
            await server.stop(0)

    asyncio.run(main())


async def check(port: int, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


def test_grpc_serves_tls_without_client_certificates_and_a_rotation_reaches_the_next_connection(pki):
    authority, cert, key = pki
    files = CertificateFiles(str(cert), str(key))

    async def test(port):
        assert await check(port, channel_credentials(str(authority.path))) == health_pb2.HealthCheckResponse.SERVING
        assert await asyncio.to_thread(peer, port, authority) == "server-1"
        authority.issue("server-2", cert, key)
        assert await asyncio.to_thread(peer, port, authority) == "server-2"
        # A half-done rotation (a certificate without its key) keeps the last good pair in service.
        other = Authority("other-ca", cert.parent)
        other.issue("server-3", cert.parent / "next.pem", cert.parent / "next.key")
        cert.write_bytes((cert.parent / "next.pem").read_bytes())
        assert await asyncio.to_thread(peer, port, authority) == "server-2"

    serve_health(files, test)


def test_the_http_context_reloads_a_replaced_certificate_and_requires_client_certificates_with_a_client_ca(pki):
    authority, cert, key = pki
    clients = Authority("clients-ca", cert.parent)
    clients.issue("client-1", cert.parent / "client.pem", cert.parent / "client.key")
    reloading = CertificateFiles(str(cert), str(key), str(clients.path)).ssl_context()
    assert reloading.context.verify_mode == ssl.CERT_REQUIRED
    first = reloading.context.get_ca_certs()
    authority.issue("server-2", cert, key)
    reloading.refresh()
    assert reloading.current.signature == reloading.files.signature()
    assert common_name_of(reloading.current.cert) == "server-2"
    assert reloading.context.get_ca_certs() == first  # the client authority is unchanged
    assert CertificateFiles(str(cert), str(key)).ssl_context().context.verify_mode == ssl.CERT_NONE


def test_files_that_are_no_certificate_and_key_stop_the_start_naming_them(pki):
    authority, cert, key = pki
    with pytest.raises(SettingsError, match="VLM_TLS_CERT_FILE=.* and VLM_TLS_KEY_FILE=.* are not a PEM"):
        CertificateFiles(str(authority.path), str(key)).grpc_credentials()  # another certificate than the key's
    with pytest.raises(SettingsError, match="VLM_TLS_CERT_FILE"):
        CertificateFiles(str(cert), str(cert)).ssl_context()


def common_name_of(pem: bytes) -> str:
    return common_name(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))


def test_the_gateway_reaches_a_triton_that_serves_tls_with_the_authority_set(pki):
    authority, cert, key = pki
    files = CertificateFiles(str(cert), str(key))

    async def main():
        server, _, port = await start_fake_triton(credentials=files.grpc_credentials())
        backend = TritonBackend(f"127.0.0.1:{port}", credentials=channel_credentials(str(authority.path)),
                                connect_timeout_s=2)
        plain = TritonBackend(f"127.0.0.1:{port}", connect_timeout_s=0.5)
        try:
            assert await collect(backend, n=2) == "t0 t1 "
            # tritonclient's own channel (health, readiness, model control) takes the credentials too:
            # the stand-in does not implement readiness, so UNIMPLEMENTED proves the handshake worked.
            with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
                await backend.client.is_server_ready()
            with pytest.raises(Exception, match="UNAVAILABLE|cannot connect"):
                await collect(plain, n=1)
        finally:
            await backend.close()
            await plain.close()
            await server.stop(0)

    asyncio.run(asyncio.wait_for(main(), 30))
