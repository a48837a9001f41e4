"""TLS for the gateway's listeners and for its connections to Triton.

The listeners' certificate, key and (for mutual TLS) client authority come from files that are read
again on the next new connection after any of them changes: a rotated certificate is served without a
restart, and connections already open keep the one they were shown.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import NamedTuple

import grpc

from gateway.settings import SettingsError

log = logging.getLogger("gateway.tls")
# How long closing an HTTPS connection waits for the client's TLS close_notify before it is dropped.
TLS_CLOSE_WAIT_S = 2.0


class Certificates(NamedTuple):
    """What the files held when read, and their `signature` then."""

    signature: tuple
    cert: bytes
    key: bytes
    client_ca: bytes | None


class CertificateFiles:
    """A listener's certificate chain and key, and the authority a client's certificate must be signed
    by when `client_ca_file` is set (mutual TLS: a client without one is refused during the handshake)."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None = None):
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._paths = [path for path in (cert_file, key_file, client_ca_file) if path]

    def signature(self) -> tuple:
        """What changes when any of the files is replaced or rewritten."""
        stats = [os.stat(path) for path in self._paths]
        return tuple((stat.st_ino, stat.st_mtime_ns, stat.st_size) for stat in stats)

    def read(self) -> Certificates:
        """The files, once they hold a certificate chain and its key; SettingsError naming them otherwise,
        e.g. between the writes of the certificate and of the key in a rotation."""
        try:
            before = self.signature()
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
            contents = [Path(path).read_bytes() for path in self._paths]
            if self.signature() != before:
                raise ValueError("replaced while being read")
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise SettingsError(f"VLM_TLS_CERT_FILE={self.cert_file} and VLM_TLS_KEY_FILE={self.key_file} are not "
                             f"a PEM certificate chain and its private key: {exc}") from None
        cert, key, *client_ca = contents
        return Certificates(before, cert, key, client_ca[0] if client_ca else None)

    def reread(self, current: Certificates | None, listener: str) -> Certificates | None:
        """The files read again if they changed since `current`; None while they did not, or while
        they are not usable (the previous certificate keeps being served, and the next connection
        tries again)."""
        try:
            if current is not None and self.signature() == current.signature:
                return None
            fresh = self.read()
        except (OSError, ValueError) as exc:  # a file missing or half-written for a moment
            log.warning("TLS files not usable: keeping the previous certificate", extra={"fields": {
                "listener": listener, "error": str(exc)}})
            return None
        if current is not None:
            log.info("TLS certificate reloaded", extra={"fields": {"listener": listener, "cert_file": self.cert_file}})
        return fresh

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificate gRPC asks for again before each new connection's handshake."""
        current = self.read()

        def configuration(files: Certificates):
            return grpc.ssl_server_certificate_configuration([(files.key, files.cert)],
                                                             root_certificates=files.client_ca)

        def fetch():  # None: keep the current configuration
            nonlocal current
            fresh = self.reread(current, "grpc")
            if fresh is None:
                return None
            current = fresh
            return configuration(fresh)

        return grpc.dynamic_ssl_server_credentials(configuration(current), fetch,
                                                   require_client_authentication=self.client_ca_file is not None)

    def ssl_context(self) -> "ReloadingContext":
        return ReloadingContext(self)


class ReloadingContext:
    """An SSLContext for the HTTP listener whose certificate is loaded again from the files when they
    changed; `refresh` runs as each connection is accepted, before its handshake."""

    def __init__(self, files: CertificateFiles):
        self.files = files
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        if files.client_ca_file:
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.current: Certificates | None = None
        self._load(files.read())

    def refresh(self) -> None:
        """Load the files again if they changed (and are usable)."""
        fresh = self.files.reread(self.current, "http")
        if fresh is not None:
            try:
                self._load(fresh)
            except (OSError, ssl.SSLError) as exc:  # replaced again since it was read: the next connection retries
                log.warning("TLS files not usable: keeping the previous certificate", extra={"fields": {
                    "listener": "http", "error": str(exc)}})

    def _load(self, files: Certificates) -> None:
        # Loaded into the same context: connections accepted from now on get the new certificate,
        # those already open keep theirs. (The client authority is added to, never replaced.)
        self.context.load_cert_chain(self.files.cert_file, self.files.key_file)
        if files.client_ca:
            self.context.load_verify_locations(cadata=files.client_ca.decode())
        self.current = files

    def protocol(self, protocol_class: type) -> type:
        """`protocol_class` (uvicorn's HTTP protocol) that refreshes the certificate for each new connection:
        asyncio makes the protocol before it wraps the connection in TLS."""
        refresh = self.refresh

        class Refreshing(protocol_class):
            def __init__(self, *args, **kwargs):
                refresh()
                super().__init__(*args, **kwargs)

            def connection_made(self, transport):
                # Closing a TLS connection, asyncio waits for the client's close_notify for up to 30 s
                # (ssl_shutdown_timeout, which uvicorn does not pass on); an idle pooled client never
                # reads to send it, so each of its connections held a drain for 30 s. The answers
                # were written before the close began: a short wait is enough.
                tls_layer = getattr(transport, "_ssl_protocol", None)
                if tls_layer is not None:
                    tls_layer._ssl_shutdown_timeout = TLS_CLOSE_WAIT_S
                super().connection_made(transport)

        return Refreshing


def channel_credentials(ca_file: str | None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """Client credentials: trust `ca_file` (None: the system's authorities) and, for mutual TLS, present
    `cert_file` with its `key_file`."""
    def read(path):
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
