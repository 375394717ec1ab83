"""The Prometheus /metrics endpoint of a service process, optionally behind TLS and basic auth
configured as Prometheus' own exporters are (exporter-toolkit's web configuration file)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import yaml
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from agentrun_server._errors import InvalidArgument

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


@dataclass(frozen=True)
class MetricsWebConfig:
    """TLS and basic auth for /metrics, read from a web configuration file in the format of
    Prometheus' exporter-toolkit (`--web.config.file`), so one file serves both::

        tls_server_config:
          cert_file: server.pem
          key_file: server.key
          client_ca_file: ca.pem                          # optional
          client_auth_type: RequireAndVerifyClientCert    # optional
        basic_auth_users:
          prometheus: $2b$12$...                          # bcrypt hash (htpasswd -nBC 12 "")
    """

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    basic_auth_users: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> MetricsWebConfig:
        """Read a web configuration file; relative file names are taken from its folder.

        Raises:
            InvalidArgument: the file cannot be read, or holds an unknown key or value.
        """
        flag = f"--metrics-web-config {path}"
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidArgument(f"{flag}: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"{flag}: not a mapping")
        unknown = set(data) - {"tls_server_config", "basic_auth_users", "http_server_config"}
        if unknown:
            raise InvalidArgument(f"{flag}: unknown keys {sorted(unknown)}")
        tls = data.get("tls_server_config") or {}
        users = data.get("basic_auth_users") or {}
        if not isinstance(tls, dict) or not isinstance(users, dict):
            raise InvalidArgument(f"{flag}: tls_server_config and basic_auth_users are mappings")
        auth_type = str(tls.get("client_auth_type", "NoClientCert"))
        if auth_type not in _CLIENT_AUTH:
            raise InvalidArgument(
                f"{flag}: client_auth_type {auth_type!r}; choose from {', '.join(_CLIENT_AUTH)}"
            )
        folder = Path(path).parent

        def resolve(name: str) -> str:
            value = str(tls.get(name, "") or "")
            return str(folder / value) if value else ""

        config = cls(
            resolve("cert_file"),
            resolve("key_file"),
            resolve("client_ca_file"),
            auth_type,
            {str(user): str(hashed) for user, hashed in users.items()},
        )
        if bool(config.cert_file) != bool(config.key_file):
            raise InvalidArgument(f"{flag}: tls_server_config needs cert_file and key_file")
        if config.basic_auth_users:
            _bcrypt()
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.cert_file:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file:
                context.load_verify_locations(self.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"--metrics-web-config: tls_server_config: {exc}") from None
        context.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        return context


def _bcrypt() -> Any:
    try:
        import bcrypt
    except ImportError:
        raise InvalidArgument(
            "--metrics-web-config: basic_auth_users needs bcrypt: pip install 'agentrun-grpc[metrics-auth]'"
        ) from None
    return bcrypt


class _BasicAuth:
    """A WSGI app behind HTTP basic auth checked against bcrypt hashes; a checked pair is
    remembered (by its SHA-256), so a scrape costs one bcrypt check per credential, not per
    scrape."""

    def __init__(self, app: Callable[..., Iterable[bytes]], users: dict[str, str]) -> None:
        self._app = app
        self._users = {user: hashed.encode() for user, hashed in users.items()}
        self._good: set[bytes] = set()
        self._lock = threading.Lock()
        self._bcrypt = _bcrypt()

    def _allowed(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self._users.get(user)
        if hashed is None:
            return False
        seen = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if seen in self._good:
                return True
        if not self._bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._good.add(seen)
        return True

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if self._allowed(environ.get("HTTP_AUTHORIZATION", "")):
            return self._app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [
                ("WWW-Authenticate", 'Basic realm="agentrun metrics"'),
                ("Content-Type", "text/plain"),
            ],
        )
        return [b"Unauthorized\n"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the base's name
        pass


class MetricsEndpoint:
    """http(s)://host:port/metrics serving `registry` from a daemon thread, until `close()`."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        web: MetricsWebConfig | None = None,
    ) -> None:
        """Bind and start serving; port 0 binds a free port (see `port`).

        Raises:
            OSError: the port cannot be bound.
            InvalidArgument: the web configuration's TLS files cannot be used.
        """
        web = web or MetricsWebConfig()
        app: Callable[..., Any] = make_wsgi_app(registry)
        if web.basic_auth_users:
            app = _BasicAuth(app, web.basic_auth_users)
        context = web.ssl_context()

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._server = make_server(host, port, app, Server, handler_class=_Quiet)
        if context is not None:
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_port)
        self.url = f"{'https' if context else 'http'}://{host}:{self.port}/metrics"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
