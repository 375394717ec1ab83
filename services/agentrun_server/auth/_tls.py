"""TLS and mTLS for the gRPC port, with certificates that reload without dropping connections.

gRPC asks for the certificate configuration at each new handshake; `ServerTls` answers with the
files' current contents when they changed on disk (or after SIGHUP), so rotating a certificate
(cert-manager, certbot) needs no restart, and open streams keep the session they have.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass, field

import grpc

from agentrun_server._errors import InvalidArgument

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """The server's certificate and, for mTLS, the CA that client certificates must chain to."""

    cert_file: str = field(default="", metadata={"flag": "cert"})
    """PEM certificate chain, leaf first. Empty: no TLS."""
    key_file: str = field(default="", metadata={"flag": "key"})
    """PEM private key of the certificate."""
    client_ca_file: str = field(default="", metadata={"flag": "client-ca"})
    """PEM CA bundle: when set, every client must present a certificate it signed (mTLS)."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgument(f"{flag} {path}: {exc.strerror or exc}") from None


class ServerTls:
    """Server credentials for `config`, re-read when a file changes or `reload()` is called.

    Raises (at construction):
        InvalidArgument: a file is missing or unreadable, or the key does not match the
            certificate.
    """

    def __init__(self, config: TlsConfig) -> None:
        if not (config.cert_file and config.key_file):
            raise InvalidArgument("--tls-cert and --tls-key: give both, or neither")
        self.config = config
        self._lock = threading.Lock()
        self._forced = False
        self._stamp = self._stamps()
        self._current = self._load()

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials whose configuration follows the files."""
        return grpc.dynamic_ssl_server_credentials(
            self._current,
            self._fetch,  # type: ignore[arg-type]  # grpc-stubs: gRPC takes None as "unchanged"
            require_client_authentication=bool(self.config.client_ca_file),
        )

    def reload(self) -> None:
        """Re-read the files at the next handshake (SIGHUP)."""
        with self._lock:
            self._forced = True

    def _paths(self) -> list[tuple[str, str]]:
        c = self.config
        return [
            (flag, path)
            for flag, path in (
                ("--tls-cert", c.cert_file),
                ("--tls-key", c.key_file),
                ("--tls-client-ca", c.client_ca_file),
            )
            if path
        ]

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for _, path in self._paths():
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((0, 0))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        c = self.config
        try:  # gRPC takes a mismatched pair silently and fails every handshake; ssl checks it
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                c.cert_file, c.key_file
            )
        except (ssl.SSLError, OSError) as exc:
            raise InvalidArgument(
                f"--tls-cert {c.cert_file} / --tls-key {c.key_file}: not a certificate and its "
                f"key ({exc})"
            ) from None
        ca = _read(c.client_ca_file, "--tls-client-ca") if c.client_ca_file else None
        return grpc.ssl_server_certificate_configuration(
            [(_read(c.key_file, "--tls-key"), _read(c.cert_file, "--tls-cert"))],
            root_certificates=ca,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC at each handshake: a stat per file, a read only when one changed.
        stamp = self._stamps()
        with self._lock:
            if stamp == self._stamp and not self._forced:
                return None
            self._stamp, self._forced = stamp, False
        try:
            self._current = self._load()
        except InvalidArgument as exc:  # mid-rotation, say: keep serving the last good pair
            _log.warning("TLS: keeping the current certificate: %s", exc)
            return None
        _log.info("TLS: certificate reloaded from %s", self.config.cert_file)
        return self._current
