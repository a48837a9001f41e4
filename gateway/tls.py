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

import grpc

log = logging.getLogger("gateway.tls")
# How long closing an HTTPS connection waits for the client's TLS close_notify before it is dropped.
TLS_CLOSE_WAIT_S = 2.0


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

    def _read(self) -> tuple[tuple, bytes, bytes, bytes | None] | None:
        """The files' bytes, once they form a usable pair; None while they do not, e.g. between the
        writes of the certificate and the key of a rotation (the previous ones keep being served)."""
        try:
            before = self.signature()
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
            contents = [Path(path).read_bytes() for path in self._paths]
            if self.signature() != before:  # replaced while being read: read them again next time
                return None
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS files not usable: keeping the previous certificate", extra={"fields": {
                "cert_file": self.cert_file, "key_file": self.key_file, "error": str(exc)}})
            return None
        cert, key, *client_ca = contents
        return before, cert, key, (client_ca[0] if client_ca else None)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificate gRPC asks for again before each new connection's handshake."""
        first = self._read()
        if first is None:
            raise ValueError(f"VLM_TLS_CERT_FILE={self.cert_file} and VLM_TLS_KEY_FILE={self.key_file} "
                             "are not a readable PEM certificate chain and its private key")
        current = first[0]

        def configuration(cert: bytes, key: bytes, client_ca: bytes | None):
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

        def fetch():  # None: keep the current configuration
            nonlocal current
            if self.signature() == current:
                return None
            fresh = self._read()
            if fresh is None:
                return None
            current = fresh[0]
            log.info("TLS certificate reloaded", extra={"fields": {"listener": "grpc", "cert_file": self.cert_file}})
            return configuration(*fresh[1:])

        return grpc.dynamic_ssl_server_credentials(configuration(*first[1:]), fetch,
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
        self.current = None
        if not self.refresh():
            raise ValueError(f"VLM_TLS_CERT_FILE={files.cert_file} and VLM_TLS_KEY_FILE={files.key_file} "
                             "are not a readable PEM certificate chain and its private key")

    def refresh(self) -> bool:
        """Load the files again if they changed; whether the context has a certificate."""
        try:
            if self.files.signature() == self.current:
                return True
        except OSError:  # a file missing for a moment during a rotation: keep what is loaded
            return self.current is not None
        fresh = self.files._read()
        if fresh is None:
            return self.current is not None
        # Loaded into the same context: connections accepted from now on get the new certificate,
        # those already open keep theirs. (The client authority is added to, never replaced.)
        try:
            self.context.load_cert_chain(self.files.cert_file, self.files.key_file)
        except (OSError, ssl.SSLError):  # replaced again since it was read: the next connection retries
            return self.current is not None
        if self.files.client_ca_file:
            self.context.load_verify_locations(cadata=fresh[3].decode())
        if self.current is not None:
            log.info("TLS certificate reloaded", extra={"fields": {"listener": "http",
                                                                   "cert_file": self.files.cert_file}})
        self.current = fresh[0]
        return True

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
