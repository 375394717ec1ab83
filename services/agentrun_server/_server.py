"""The server process: one grpc.aio server hosting the ingestion service, the orchestrator, or both.

Lifecycle: `start()` opens storage, binds the port and starts serving; `shutdown(grace_seconds)`
turns health to NOT_SERVING, ends the Work streams with UNAVAILABLE (their leases stay leased, for
the workers to resume on their next stream, here after a restart or at another process), stops
accepting calls, lets in-flight calls finish within the grace period, then closes storage.
`serve()` runs until SIGTERM or SIGINT and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.registry import Collector

from agentrun.v1 import (
    ingestion_service_pb2,
    key_service_pb2,
    key_service_pb2_grpc,
    orchestrator_service_pb2,
    orchestrator_service_pb2_grpc,
)
from agentrun_server._errors import InvalidArgument
from agentrun_server.auth import Access, AuthInterceptor, KeyRing, KeyServicer, ServerTls
from agentrun_server.auth._tls import TlsConfig
from agentrun_server.ingestion import (
    AbandonSweep,
    IngestionLimits,
    IngestionMetrics,
    IngestionServicer,
    live_runs_collector,
)
from agentrun_server.orchestrator import (
    RESUME_GRACE_SECONDS,
    Dispatcher,
    OrchestratorMetrics,
    OrchestratorServicer,
    WorkLimits,
    backlog_collector,
)
from agentrun_server.serving import (
    ErrorInterceptor,
    GrpcServerMetrics,
    MetricsEndpoint,
    MetricsInterceptor,
    MetricsWebConfig,
)
from agentrun_server.storage import Notifier, PoolConfig, SqliteConfig, Storage, open_storage

_log = logging.getLogger(__name__)

SERVICES = ("ingestion", "orchestrator")
AUTH_MODES = ("none", "keys")
_KEY_SERVICE = key_service_pb2.DESCRIPTOR.services_by_name["KeyService"]
_SERVICE_DESCRIPTORS = {
    "ingestion": ingestion_service_pb2.DESCRIPTOR.services_by_name["IngestionService"],
    "orchestrator": orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"{name}: not an integer: {value!r}") from None


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1); "0.0.0.0", "::"
    and names that resolve elsewhere (or not at all) are not."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def _in_use(host: str, port: int) -> bool:
    """Whether another process listens on host:port (checked before gRPC binds, which would
    log its own error line first)."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


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
    """How to run the server. `from_env()` reads the AGENTRUN_* variables."""

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
    metrics_web_config: str = ""
    """A web configuration file for /metrics in exporter-toolkit's format (TLS, basic auth);
    empty: plain HTTP, open to whoever reaches `metrics_host`."""
    auth: str = "none"
    """"keys": every call needs a live API key (or a client certificate entry) with the scope
    its RPC needs; "none": no credentials checked (loopback, or with `insecure`)."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """The gRPC port's certificate (TLS) and client CA (mTLS); by default plaintext."""
    insecure: bool = False
    """With auth "none", serve gRPC on a non-loopback `host` to every client on the network,
    unauthenticated: said at start (WARNING) and by the gauge `agentrun_server_insecure`."""
    services: tuple[str, ...] = SERVICES
    """Which of the pair this process serves."""
    grace_seconds: float = 10.0
    """How long shutdown waits for in-flight calls."""
    limits: IngestionLimits = field(default_factory=IngestionLimits)
    """Ingestion limits."""
    work_limits: WorkLimits = field(default_factory=WorkLimits)
    """What one Work stream may hold, and Work streams per client host."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Keepalive, its enforcement, and connection age."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """The database server's connection pool and statement timeout (PostgreSQL)."""
    sqlite: SqliteConfig = field(default_factory=SqliteConfig)
    """SQLite's durability: commits synced at each write ("full") or at checkpoints ("normal")."""
    resume_grace_seconds: float = RESUME_GRACE_SECONDS
    """How long a lease whose stream ended (or whose server went silent) waits for its worker
    to resume it on a new stream before its task is retried, the attempt counted."""

    @classmethod
    def from_env(cls) -> ServerConfig:
        """Defaults overridden by AGENTRUN_DB, AGENTRUN_HOST, AGENTRUN_PORT, AGENTRUN_METRICS_HOST,
        AGENTRUN_METRICS_PORT, AGENTRUN_METRICS_WEB_CONFIG, AGENTRUN_AUTH, AGENTRUN_TLS_CERT, AGENTRUN_TLS_KEY,
        AGENTRUN_TLS_CLIENT_CA.

        Raises:
            InvalidArgument: a variable does not parse.
        """
        defaults = cls()
        return cls(
            db=os.environ.get("AGENTRUN_DB") or defaults.db,
            host=os.environ.get("AGENTRUN_HOST") or defaults.host,
            port=_env_int("AGENTRUN_PORT", defaults.port),
            metrics_host=os.environ.get("AGENTRUN_METRICS_HOST") or defaults.metrics_host,
            metrics_port=_env_int("AGENTRUN_METRICS_PORT", defaults.metrics_port),
            metrics_web_config=os.environ.get("AGENTRUN_METRICS_WEB_CONFIG", ""),
            auth=os.environ.get("AGENTRUN_AUTH") or defaults.auth,
            tls=TlsConfig(
                os.environ.get("AGENTRUN_TLS_CERT", ""),
                os.environ.get("AGENTRUN_TLS_KEY", ""),
                os.environ.get("AGENTRUN_TLS_CLIENT_CA", ""),
            ),
        )


class Server:
    """The agentrun server process."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None) -> None:
        # The `_created` series double what go-grpc-prometheus dashboards expect to see, and no
        # panel uses them (process-wide: prometheus-client has no per-registry switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._health_server: grpc.aio.Server | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._storage: Storage | None = None
        self._grpc: grpc.aio.Server | None = None
        self._dispatcher: Dispatcher | None = None
        self._sweep: AbandonSweep | None = None
        self._scraped: list[Collector] = []  # metrics read from the database at scrape
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # untyped
        self._keys: KeyRing | None = None
        self._notifier: Notifier | None = None
        self.tls: ServerTls | None = None

    async def start(self) -> None:
        """Open storage and start serving.

        Raises:
            InvalidArgument: bad configuration (unknown service, unsupported database URL, a port
                in use).
            Unavailable: the database cannot be reached.
        """
        config = self.config
        if config.auth not in AUTH_MODES:
            raise InvalidArgument(f"--auth: {config.auth!r}; choose keys or none")
        exposed = not is_loopback(config.host)
        open_to_all = exposed and config.auth == "none"
        if open_to_all and not config.insecure:
            raise InvalidArgument(
                f"--host {config.host}: not a loopback address, and --auth none checks no "
                "credentials: every client that reaches it could read every run and settle or "
                "cancel any task. Pass --auth keys (make the first key with `agentrun keys "
                f"create admin --scope admin --db {config.db}`), bind 127.0.0.1 behind an "
                "authenticating proxy, or pass --insecure to serve the network "
                "unauthenticated anyway"
            )
        if config.tls.enabled or config.tls.key_file or config.tls.client_ca_file:
            self.tls = ServerTls(config.tls)
        web = (
            MetricsWebConfig.load(config.metrics_web_config) if config.metrics_web_config else None
        )
        unknown = set(config.services) - set(SERVICES)
        if unknown or not config.services:
            raise InvalidArgument(
                f"services: choose from {', '.join(SERVICES)}; got {sorted(unknown)}"
            )
        self._storage = storage = await open_storage(config.db, config.pool, config.sqlite)
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if config.auth == "keys":
            self._keys = KeyRing(storage)
            await self._keys.start()
            interceptors.append(AuthInterceptor(self._keys, self.registry))
            if not self._keys.count:
                _log.warning(
                    "--auth keys: the database holds no API key yet, so every call is refused; "
                    "make the first with `agentrun keys create admin --scope admin --db %s`",
                    config.db,
                )
            if exposed and self.tls is None:
                _log.warning(
                    "--auth keys without --tls-cert: API keys cross the network in plaintext; "
                    "terminate TLS here (--tls-cert, --tls-key) or in a proxy in front"
                )
        limit = config.limits.max_message_bytes
        grpc_metrics = GrpcServerMetrics(self.registry)
        insecure = Gauge(
            "agentrun_server_insecure",
            "1 when this server serves a non-loopback address without authentication (--insecure).",
            registry=self.registry,
        )
        insecure.set(1 if open_to_all else 0)
        if open_to_all:
            _log.warning(
                "serving %s:%d to the network WITHOUT authentication (--insecure): any client "
                "that reaches it can read every run and settle or cancel any task",
                config.host,
                config.port,
            )
        self._grpc = server = grpc.aio.server(
            # Metrics first: it counts the status the error table settles on.
            # Auth after the error table, which answers what it raises.
            interceptors=[MetricsInterceptor(grpc_metrics), ErrorInterceptor(), *interceptors],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                *config.connections.options(),
                # A second server on a port in use must fail, not share it (and the calls).
                ("grpc.so_reuseport", 0),
            ],
        )
        wake = None
        access = Access(storage)
        self._notifier = notifier = storage.notifier()
        if "orchestrator" in config.services:
            metrics = OrchestratorMetrics(self.registry)
            self._dispatcher = Dispatcher(
                storage,
                metrics,
                notifier,
                resume_grace_seconds=config.resume_grace_seconds,
                max_leases_per_key=config.work_limits.max_leases_per_key,
            )
            self._scraped.append(
                backlog_collector(asyncio.get_running_loop(), self._dispatcher.snapshot)
            )
            self.registry.register(self._scraped[-1])
            wake = self._dispatcher.wake
            orchestrator_service_pb2_grpc.add_OrchestratorServiceServicer_to_server(
                OrchestratorServicer(
                    storage, self._dispatcher, metrics, limit, config.work_limits, access
                ),
                server,
            )
        if "ingestion" in config.services:
            self._scraped.append(
                live_runs_collector(
                    asyncio.get_running_loop(), storage, config.limits.live_run_timeout_seconds
                )
            )
            self.registry.register(self._scraped[-1])
            ingestion_metrics = IngestionMetrics(self.registry)
            IngestionServicer(
                storage, ingestion_metrics, config.limits, wake, access, notifier
            ).add_to_server(server)
            self._sweep = AbandonSweep(
                storage, config.limits.live_run_timeout_seconds, ingestion_metrics, wake
            )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(
            KeyServicer(storage, self._keys.reload if self._keys else None), server
        )
        names = [
            *(_SERVICE_DESCRIPTORS[s].full_name for s in config.services),
            _KEY_SERVICE.full_name,
        ]
        grpc_metrics.preregister(
            [
                *(_SERVICE_DESCRIPTORS[s] for s in config.services),
                _KEY_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"],
            ]
        )
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        address = f"{config.host}:{config.port}"
        try:
            if _in_use(config.host, config.port):
                self.port = 0
            elif self.tls is not None:
                self.port = server.add_secure_port(address, self.tls.credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            await self.shutdown(0)
            raise InvalidArgument(
                f"--port: cannot listen on {address}: in use (another agentrun serve?) or not "
                "this machine's; pick another with --port, or 0 for any free one"
            )
        await server.start()
        if config.health_port >= 0:
            await self._serve_health(config.host, config.health_port)
        elif self.tls is not None and config.tls.client_ca_file:
            _log.warning(
                "--tls-client-ca: every call needs a client certificate, health checks too; "
                "serve them to load balancers without one with --health-port"
            )
        if self._dispatcher is not None:
            await self._dispatcher.start()
        await notifier.start()
        if self._sweep is not None:
            self._sweep.start()
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port >= 0:
            try:
                self._metrics_endpoint = MetricsEndpoint(
                    config.metrics_host, config.metrics_port, self.registry, web
                )
            except InvalidArgument:
                await self.shutdown(0)
                raise
            except OSError as exc:
                await self.shutdown(0)
                raise InvalidArgument(
                    f"--metrics-port: cannot serve metrics on {config.metrics_host}:"
                    f"{config.metrics_port}: "
                    f"{exc.strerror or exc}; pick another, 0 for any free one, or -1 for none"
                ) from None
            self.metrics_port = self._metrics_endpoint.port

    async def _serve_health(self, host: str, port: int) -> None:
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, health_server)
        try:
            self.health_port = (
                0 if _in_use(host, port) else health_server.add_insecure_port(f"{host}:{port}")
            )
        except RuntimeError:
            self.health_port = 0
        if self.health_port == 0:
            await self.shutdown(0)
            raise InvalidArgument(
                f"--health-port: cannot listen on {host}:{port}: in use or not this machine's; "
                "pick another, 0 for any free one, or -1 for none"
            )
        await health_server.start()
        self._health_server = health_server

    @property
    def metrics_url(self) -> str:
        """Where /metrics is served (https with a web configuration's TLS); "" when it is not."""
        return self._metrics_endpoint.url if self._metrics_endpoint is not None else ""

    async def shutdown(self, grace_seconds: float | None = None) -> None:
        """Stop gracefully: NOT_SERVING, finish in-flight calls within the grace, close storage.

        Idempotent: a second call (say, from a signal and from a finally) waits for nothing.
        """
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        await self._health.enter_graceful_shutdown()
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            await dispatcher.close_streams()
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop(grace)
        health_server, self._health_server = self._health_server, None
        if health_server is not None:
            await health_server.stop(0)
        if dispatcher is not None:
            await dispatcher.stop()
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.close()
        sweep, self._sweep = self._sweep, None
        if sweep is not None:
            await sweep.stop()
        endpoint, self._metrics_endpoint = self._metrics_endpoint, None
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)
        scraped, self._scraped = self._scraped, []
        for collector in scraped:
            self.registry.unregister(collector)
        keys, self._keys = self._keys, None
        if keys is not None:
            await keys.shutdown()
        storage, self._storage = self._storage, None
        if storage is not None:
            await storage.close()

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Start, run until SIGTERM or SIGINT, then shut down gracefully. SIGHUP re-reads the
        TLS files at the next handshake."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        if self.tls is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self.tls.reload)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            _log.info("shutting down (grace %.0f s)", self.config.grace_seconds)
            await self.shutdown()
