"""The server's configuration: `ServerConfig`, its parts, and the one table that makes a flag and an
environment variable of every field (`settings()`), so `agentrun serve --help`, `AGENTRUN_*` and
the dataclasses never drift apart.

A field `limits.max_run_bytes` is the flag `--max-run-bytes` and the variable
`AGENTRUN_MAX_RUN_BYTES`; a part's fields take its prefix (`pool.max_connections` is
`--db-max-connections`); a field's docstring is its help. A flag given wins over its variable,
which wins over the default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import os
import textwrap
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentrun_server._errors import InvalidArgument
from agentrun_server.auth._tls import TlsConfig
from agentrun_server.ingestion import IngestionLimits
from agentrun_server.orchestrator import RESUME_GRACE_SECONDS, WorkLimits
from agentrun_server.storage import PoolConfig, SqliteConfig

SERVICES = ("ingestion", "orchestrator")
AUTH_MODES = ("none", "keys")
ENV_PREFIX = "AGENTRUN_"


@dataclass(frozen=True)
class ConnectionLimits:
    """HTTP/2 connection policy: dead peers found, over-eager pingers cut off, no connection
    kept forever."""

    keepalive_seconds: float = 30.0
    """The server pings a connection idle this long..."""
    keepalive_timeout_seconds: float = 10.0
    """...and closes it when the ping is not answered within this."""
    min_client_ping_interval_seconds: float = 10.0
    """Clients may ping at most this often; after `max_ping_strikes` pings too soon the server
    closes the connection (GOAWAY ENHANCE_YOUR_CALM), as gRPC's keepalive enforcement does."""
    max_ping_strikes: int = 2
    """Pings too soon a client may send before its connection is closed."""
    max_connection_age_seconds: float = 3600.0
    """A connection older than this is asked to go away (GOAWAY, +-10 % jitter): clients open a
    new one, which also spreads them over replicas. Work streams resume their leases on it."""
    max_connection_age_grace_seconds: float = 300.0
    """How long calls on an aged connection may run on before it is closed."""
    max_concurrent_streams: int = 1024
    """Calls open at once on one connection."""

    def options(self) -> list[tuple[str, int]]:
        """The grpc server options of this policy."""
        return [
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            (
                "grpc.http2.min_recv_ping_interval_without_data_ms",
                int(self.min_client_ping_interval_seconds * 1000),
            ),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_seconds * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(self.max_connection_age_grace_seconds * 1000),
            ),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            # What a stream not being read may buffer: HTTP/2's 64 KiB. BDP probing would grow
            # every stream's window to megabytes, so an upload waiting for room under
            # max_pending_bytes held about 10 MB of its next message anyway.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 64 * 1024),
        ]


@dataclass(frozen=True)
class ServerConfig:
    """How to run the server. `settings()` makes a flag and an environment variable of each field
    (`agentrun serve --help`); `from_env()` reads the variables."""

    db: str = "sqlite:///agentrun.db"
    """Database URL: sqlite:///PATH (relative), sqlite:////PATH (absolute), or
    postgresql://USER@HOST:PORT/DBNAME."""
    host: str = "127.0.0.1"
    """Interface for gRPC. An address other than loopback needs `auth="keys"` (or `insecure`)."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Interface for /metrics: loopback by default, so exposing gRPC does not expose metrics."""
    metrics_port: int = 9464
    """Prometheus /metrics port; 0 picks a free one, -1 disables it."""
    health_port: int = -1
    """A second gRPC port, on `host`, serving only the health service (`grpc.health.v1`), in
    plaintext and to anyone: for load balancers and probes that hold no client certificate when
    the main port requires one (mTLS), or speak no TLS (Kubernetes' gRPC probes). 0 picks a
    free one; -1: none (under mTLS, health checks then need a client certificate too)."""
    otlp_port: int = -1
    """A second port for the same gRPC server, on `host`, where OpenTelemetry exporters expect
    OTLP (4317 by convention); every service answers there too, under the same keys and TLS.
    0 picks a free one; -1: none (exporters use `port`)."""
    web_host: str = "127.0.0.1"
    """Interface for the web console: loopback by default, as /metrics. Under auth "none" a
    non-loopback one needs `insecure`, as gRPC does."""
    web_port: int = 8080
    """The web console's HTTP port (read runs as they happen, operate the task queue); 0 picks
    a free one, -1 turns it off."""
    metrics_web_config: str = ""
    """A web configuration file for /metrics in exporter-toolkit's format (TLS, basic auth);
    empty: plain HTTP, open to whoever reaches `metrics_host`."""
    auth: str = field(default="none", metadata={"choices": AUTH_MODES})
    """"keys": every call needs a live API key (or a client certificate entry) with the scope
    its RPC needs; "none": no credentials checked (loopback, or with `insecure`)."""
    tls: TlsConfig = field(default_factory=TlsConfig, metadata={"prefix": "tls-"})
    """The gRPC port's certificate (TLS) and client CA (mTLS); by default plaintext."""
    insecure: bool = False
    """With auth "none", serve gRPC on a non-loopback `host` to every client on the network,
    unauthenticated: said at start (WARNING) and by the gauge `agentrun_server_insecure`."""
    services: tuple[str, ...] = field(default=SERVICES, metadata={"flag": "only"})
    """Which of the pair this process serves (`--only` one of them; default both)."""
    grace_seconds: float = 10.0
    """How long shutdown waits for in-flight calls."""
    limits: IngestionLimits = field(default_factory=IngestionLimits, metadata={"prefix": ""})
    """Ingestion limits."""
    work_limits: WorkLimits = field(default_factory=WorkLimits, metadata={"prefix": "work-"})
    """What Work streams may hold, and how many may be open."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits, metadata={"prefix": ""})
    """Keepalive, its enforcement, and connection age."""
    pool: PoolConfig = field(default_factory=PoolConfig, metadata={"prefix": "db-"})
    """The database server's connection pool and statement timeout (PostgreSQL)."""
    sqlite: SqliteConfig = field(default_factory=SqliteConfig, metadata={"prefix": "sqlite-"})
    """SQLite's durability: commits synced at each write ("full") or at checkpoints ("normal")."""
    resume_grace_seconds: float = RESUME_GRACE_SECONDS
    """How long a lease whose stream ended (or whose server went silent) waits for its worker
    to resume it on a new stream before its task is retried, the attempt counted."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """The defaults, overridden by the AGENTRUN_* variables set (`settings()` names them).

        Raises:
            InvalidArgument: a variable does not parse, naming it.
        """
        return config_from(None, environ)


@dataclass(frozen=True)
class Setting:
    """One leaf field of `ServerConfig` as the command line and the environment name it."""

    path: tuple[str, ...]
    """Field names from ServerConfig down, e.g. ("pool", "max_connections")."""
    flag: str
    """e.g. "--db-max-connections"."""
    env: str
    """e.g. "AGENTRUN_DB_MAX_CONNECTIONS"."""
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    group: str = ""
    """The part it belongs to ("" for ServerConfig's own fields), for --help."""
    aliases: tuple[str, ...] = ()
    """Older spellings of the flag, still taken."""

    def parse(self, text: str, source: str) -> Any:
        """A value of this setting from text (a variable's); `source` names it in errors.

        Raises:
            InvalidArgument: the text is not a value of this setting.
        """
        if self.kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise InvalidArgument(f"{source}: {text!r} is not a boolean (1 or 0)")
        if self.kind is tuple:  # --only: one of the services
            value = text.strip()
            if value not in SERVICES:
                raise InvalidArgument(f"{source}: {text!r}; choose from {', '.join(SERVICES)}")
            return (value,)
        try:
            value = self.kind(text)
        except ValueError:
            raise InvalidArgument(
                f"{source}: {text!r} is not {'an integer' if self.kind is int else 'a number'}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise InvalidArgument(f"{source}: {text!r}; choose from {', '.join(self.choices)}")
        return value


def _docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string after each field), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _leaves(
    cls: type, path: tuple[str, ...], prefix: str, group: str, defaults: Any
) -> Iterator[Setting]:
    docs = _docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            part = type(value)
            title = " ".join((part.__doc__ or part.__name__).split()).split(". ")[0].rstrip(".")
            yield from _leaves(part, (*path, f.name), f.metadata["prefix"], title, value)
            continue
        name = f.metadata.get("flag", f.name.replace("_", "-"))
        kind = hints[f.name]
        kind = tuple if typing.get_origin(kind) is tuple else kind
        flag = f"--{prefix}{name}"
        yield Setting(
            (*path, f.name),
            flag,
            ENV_PREFIX + flag[2:].upper().replace("-", "_"),
            kind,
            value,
            docs.get(f.name, ""),
            f.metadata.get("choices"),
            group,
            f.metadata.get("aliases", ()),
        )


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every setting of the server, in the order of the dataclasses (read off their source once,
    when first asked: not at import)."""
    return tuple(_leaves(ServerConfig, (), "", "", ServerConfig()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per setting to `parser` (`config_from` reads them back); none has a default
    there, so an absent flag falls back to its variable, then to the field's default."""
    groups: dict[str, Any] = {}
    for s in settings():
        target = parser
        if s.group:
            if s.group not in groups:
                groups[s.group] = parser.add_argument_group(s.group)
            target = groups[s.group]
        shown = s.default if s.kind is not tuple else "both"
        help = f"{s.help} [env {s.env}; default {shown}]".replace("%", "%%")
        dest = "_".join(s.path)
        flags = (s.flag, *s.aliases)
        if s.kind is bool:
            target.add_argument(*flags, dest=dest, action="store_const", const=True, help=help)
        elif s.kind is tuple:
            target.add_argument(*flags, dest=dest, choices=SERVICES, help=help)
        else:
            target.add_argument(
                *flags, dest=dest, type=s.kind, choices=s.choices, help=help, metavar=_metavar(s)
            )


def _metavar(s: Setting) -> str | None:
    name = s.path[-1]
    if s.choices is not None:
        return None
    if s.kind is int:
        return "N"
    if s.kind is float:
        return "SECONDS" if name.endswith("seconds") else "X"
    if name.endswith(("_file", "_config")):
        return "FILE"
    return {"db": "URL", "host": "HOST", "metrics_host": "HOST", "web_host": "HOST"}.get(
        name, "TEXT"
    )


def config_from(
    arguments: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """The configuration that flags (`add_arguments`' namespace) and variables give.

    Raises:
        InvalidArgument: a variable does not parse, naming it; or a value a part refuses.
    """
    environ = os.environ if environ is None else environ
    values: dict[tuple[str, ...], Any] = {}
    for s in settings():
        given = None if arguments is None else getattr(arguments, "_".join(s.path), None)
        if given is not None:
            values[s.path] = (given,) if s.kind is tuple else given
        elif environ.get(s.env, "") != "":
            values[s.path] = s.parse(environ[s.env], s.env)
    try:
        config: ServerConfig = _build(ServerConfig, (), values)
    except ValueError as exc:  # a part's own check, e.g. SqliteConfig.synchronous
        raise InvalidArgument(str(exc)) from None
    return config


def _build(cls: type, path: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> Any:
    defaults = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        here = (*path, f.name)
        part = getattr(defaults, f.name)
        if dataclasses.is_dataclass(part):
            kwargs[f.name] = _build(type(part), here, values)
        elif here in values:
            kwargs[f.name] = values[here]
    return cls(**kwargs)
