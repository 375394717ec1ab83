"""How a client reaches the server: one typed `Connection` for `Client`, `AgentRunWriter`,
`init`, `Runner` and the CLI, and the channels built from it."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

import grpc

from agentrun._errors import ConnectionConfigError
from agentrun.wire.connection import (
    DEFAULT_SERVER,
    ENV_API_KEY,
    ENV_SERVER,
    ENV_TLS,
    ENV_TLS_CA,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    ENV_TLS_SERVER_NAME,
    MAX_MESSAGE_BYTES,
    URL_SCHEMES,
)

_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def resolve_server(server_url: str | None) -> tuple[str, bool | None]:
    """Return (gRPC target, TLS) for a server URL; TLS is None when the URL does not say.

    Accepts `host:port`, `grpc://host:port`, `http://host:port` (plaintext), `grpcs://` or
    `https://` (TLS); a list of replicas, `host:port,host:port` (IP addresses), or a gRPC target
    (`dns:///agentrun.internal:50051`, `ipv4:10.0.0.1:50051,10.0.0.2:50051`): calls are balanced
    over the replicas (round robin). None means $AGENTRUN_SERVER, else 127.0.0.1:50051.
    """
    url = server_url or os.environ.get(ENV_SERVER) or DEFAULT_SERVER
    tls = None
    for scheme, secure in URL_SCHEMES.items():
        if url.startswith(scheme):
            url, tls = url.removeprefix(scheme).rstrip("/"), secure
            break
    if "," in url and not url.startswith(_TARGET_SCHEMES):
        family = "ipv6" if url.startswith("[") else "ipv4"
        url = f"{family}:{url}"
    return url, tls


def _hosts(target: str) -> list[str]:
    if target.startswith("unix:"):
        return []
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target.removeprefix(scheme).lstrip("/")
            if scheme == "dns:" and "/" in target:  # dns://authority/host:port
                target = target.split("/", 1)[1]
    hosts = []
    for address in target.split(","):
        if address.startswith("["):
            hosts.append(address[1:].split("]", 1)[0])
        else:
            hosts.append(address.rsplit(":", 1)[0] if address.count(":") == 1 else address)
    return hosts


def is_loopback_target(target: str) -> bool:
    """Whether every address of a gRPC target is this machine's (loopback, or a unix socket)."""
    for host in _hosts(target):
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def _env_tls() -> bool | None:
    value = os.environ.get(ENV_TLS, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        raise ConnectionConfigError(f"$AGENTRUN_TLS: {value!r}; use 1 or 0")
    return None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConnectionConfigError(f"{what} {path}: {exc.strerror or exc}") from None


_REDACTED = "<redacted>"


def _secret(name: str) -> bool:
    name = name.lower()
    return name == "authorization" or any(w in name for w in ("key", "token", "secret", "pass"))


@dataclass(frozen=True)
class Connection:
    """How to reach an agentrun server: address, TLS, credentials. Fields left None come from
    the environment when the channel is made.

    TLS is on when `tls` is True, the URL is `grpcs://` or `https://`, a CA or client
    certificate is given, or an API key goes to an address that is not this machine's (as
    Temporal's client turns TLS on with an API key). An API key is never sent in plaintext to
    another machine unless `allow_plaintext_key` (say, behind a TLS-terminating sidecar).

    Raises (when a channel is made): ConnectionConfigError naming the setting at fault.
    """

    server_url: str | None = None
    """`host:port`, `grpcs://host:port`, replicas `a:p,b:p`, or a gRPC target; None:
    $AGENTRUN_SERVER, else 127.0.0.1:50051."""
    api_key: str | None = None
    """Sent as `authorization: Bearer <key>`; None: $AGENTRUN_API_KEY."""
    tls: bool | None = None
    """Force TLS on or off; None: $AGENTRUN_TLS (1/0), else decided as above."""
    tls_ca_file: str | None = None
    """PEM CA bundle to verify the server with (None: $AGENTRUN_TLS_CA, else the system's)."""
    tls_cert_file: str | None = None
    """PEM client certificate, for mTLS ($AGENTRUN_TLS_CERT)."""
    tls_key_file: str | None = None
    """PEM key of the client certificate ($AGENTRUN_TLS_KEY)."""
    tls_server_name: str | None = None
    """The name to verify the server's certificate against, when it differs from the address
    ($AGENTRUN_TLS_SERVER_NAME)."""
    metadata: tuple[tuple[str, str], ...] = ()
    """Extra metadata sent with every call."""
    keepalive_seconds: float = 30.0
    """Ping an idle connection this often (the server allows no less than 10 s)."""
    allow_plaintext_key: bool = False
    """Send an API key without TLS to another machine."""

    def __repr__(self) -> str:
        """The fields, with the API key and secret-looking metadata values redacted (a repr ends
        up in logs and tracebacks)."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key" and value:
                value = _REDACTED
            elif f.name == "metadata":
                value = tuple((k, _REDACTED if _secret(k) else v) for k, v in value)
            shown.append(f"{f.name}={value!r}")
        return f"Connection({', '.join(shown)})"

    def with_overrides(self, **fields: Any) -> Connection:
        """This connection with the fields given not None replaced."""
        return dataclasses.replace(self, **{k: v for k, v in fields.items() if v is not None})

    @property
    def target(self) -> str:
        """The gRPC target this connection dials."""
        return resolve_server(self.server_url)[0]

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the API key's `authorization`, then `metadata`."""
        key = self.api_key or os.environ.get(ENV_API_KEY)
        auth = (("authorization", f"Bearer {key}"),) if key else ()
        return (*auth, *self.metadata)

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Calls spread over every address the target resolves to (replicas behind one DNS
            # name, or an ipv4: list); one that goes down is skipped until it is back.
            ("grpc.lb_policy_name", "round_robin"),
        ]
        name = self.server_name()
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        return options

    def tls_files(self) -> tuple[str | None, str | None, str | None]:
        """(CA bundle, client certificate, its key): the fields, else their variables."""
        return (
            self.tls_ca_file or os.environ.get(ENV_TLS_CA),
            self.tls_cert_file or os.environ.get(ENV_TLS_CERT),
            self.tls_key_file or os.environ.get(ENV_TLS_KEY),
        )

    def uses_tls(self) -> bool:
        """Whether the channel speaks TLS (decided as the class says)."""
        target, url_tls = resolve_server(self.server_url)
        tls = self.tls if self.tls is not None else _env_tls()
        if tls is None:
            tls = url_tls
        if tls is None:
            ca, cert, _ = self.tls_files()
            has_key = bool(self.api_key or os.environ.get(ENV_API_KEY))
            tls = bool(ca or cert) or (has_key and not is_loopback_target(target))
        return tls

    def server_name(self) -> str | None:
        """The name the server's certificate is verified against, when it is not the address's."""
        return self.tls_server_name or os.environ.get(ENV_TLS_SERVER_NAME)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext.

        Raises:
            ConnectionConfigError: an API key would go in plaintext to another machine, half a
                client certificate is given, or a file cannot be read.
        """
        target = self.target
        ca, cert, key_file = self.tls_files()
        has_key = bool(self.api_key or os.environ.get(ENV_API_KEY))
        local = is_loopback_target(target)
        if not self.uses_tls():
            if has_key and not local and not self.allow_plaintext_key:
                raise ConnectionConfigError(
                    f"refusing to send the API key in plaintext to {target}: use TLS "
                    "(grpcs://, --tls-ca or $AGENTRUN_TLS=1), or allow_plaintext_key=True if a "
                    "TLS proxy on this machine carries the connection"
                )
            return None
        if bool(cert) != bool(key_file):
            raise ConnectionConfigError(
                "tls_cert_file and tls_key_file ($AGENTRUN_TLS_CERT, $AGENTRUN_TLS_KEY): give "
                "both for a client certificate, or neither"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read(ca, "tls_ca_file") if ca else None,
            private_key=_read(key_file, "tls_key_file") if key_file else None,
            certificate_chain=_read(cert, "tls_cert_file") if cert else None,
        )

    def channel(self) -> grpc.Channel:
        """A synchronous channel."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=self.channel_options())
        return grpc.secure_channel(self.target, credentials, options=self.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel (create it inside the event loop that uses it)."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self.channel_options())
        return grpc.aio.secure_channel(self.target, credentials, options=self.channel_options())


def connection_of(
    server_url: str | None = None,
    api_key: str | None = None,
    connection: Connection | None = None,
) -> Connection:
    """The connection of a constructor's `server_url`, `api_key` and `connection` arguments:
    `connection` (default: from the environment) with the other two, where given, replacing
    its own."""
    return (connection or Connection()).with_overrides(server_url=server_url, api_key=api_key)


def add_connection_arguments(parser: argparse.ArgumentParser, server: str | None = None) -> None:
    """The command-line options of a `Connection`: --server, --api-key-file, --tls, --tls-ca,
    --tls-cert, --tls-key, --tls-server-name (each defaulting to its environment variable)."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=server,
        help=f"server host:port, grpcs://host:port for TLS, or replicas a:p,b:p "
        f"[default: ${ENV_SERVER} or {DEFAULT_SERVER}]",
    )
    group.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"read the API key from FILE [default: ${ENV_API_KEY}] (a key is never taken on "
        "the command line, where other users' `ps` would see it)",
    )
    group.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TLS on or off [default: $AGENTRUN_TLS; else on for grpcs://, a CA or a client "
        "certificate, or an API key sent to another machine]",
    )
    group.add_argument("--tls-ca", metavar="FILE", help="CA bundle, PEM [$AGENTRUN_TLS_CA]")
    group.add_argument(
        "--tls-cert", metavar="FILE", help="client certificate for mTLS, PEM [$AGENTRUN_TLS_CERT]"
    )
    group.add_argument(
        "--tls-key", metavar="FILE", help="client certificate's key, PEM [$AGENTRUN_TLS_KEY]"
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name to verify the server certificate against [$AGENTRUN_TLS_SERVER_NAME]",
    )


def connection_from_arguments(
    args: argparse.Namespace, base: Connection | None = None
) -> Connection:
    """`base` (default: from the environment) with the options `add_connection_arguments` added,
    where given.

    Raises:
        ConnectionConfigError: the API key file cannot be read.
    """
    api_key = None
    if args.api_key_file:
        api_key = _read(args.api_key_file, "--api-key-file").decode().strip()
    return (base or Connection()).with_overrides(
        server_url=args.server,
        api_key=api_key,
        tls=args.tls,
        tls_ca_file=args.tls_ca,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_server_name=args.tls_server_name,
    )
