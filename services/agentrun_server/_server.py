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
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.registry import Collector

from agentrun.v1 import (
    ingestion_service_pb2,
    key_service_pb2,
    key_service_pb2_grpc,
    orchestrator_service_pb2,
)
from agentrun_server._config import AUTH_MODES, SERVICES, ServerConfig
from agentrun_server._errors import InvalidArgument
from agentrun_server.auth import Access, AuthInterceptor, KeyRing, KeyServicer, ServerTls
from agentrun_server.ingestion import (
    AbandonSweep,
    FacetBackfill,
    IngestionMetrics,
    IngestionServicer,
    RetentionSweep,
    live_runs_collector,
)
from agentrun_server.orchestrator import (
    Dispatcher,
    OrchestratorMetrics,
    OrchestratorServicer,
    backlog_collector,
)
from agentrun_server.otlp import (
    OtlpLogsServicer,
    OtlpMetrics,
    OtlpTraceServicer,
    TraceFinishSweep,
)
from agentrun_server.serving import (
    ErrorInterceptor,
    GrpcServerMetrics,
    MetricsEndpoint,
    MetricsInterceptor,
    MetricsWebConfig,
    enable_reflection,
)
from agentrun_server.storage import Notifier, Storage, open_storage
from agentrun_server.web import WebConsole

_log = logging.getLogger(__name__)

_KEY_SERVICE = key_service_pb2.DESCRIPTOR.services_by_name["KeyService"]
_OTLP_SERVICES = (
    trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"],
    logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"],
)
_SERVICE_DESCRIPTORS = {
    "ingestion": ingestion_service_pb2.DESCRIPTOR.services_by_name["IngestionService"],
    "orchestrator": orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
}


class _QuietGoneClients(logging.Filter):
    """Drops grpc's ERROR record of a streamed answer that could not be sent because its client
    went away in the middle of it (`ExecuteBatchError`: a reader that had what it wanted and
    cancelled, a connection closed): normal for a server of streams, and counted by the call's
    status in the gRPC metrics; our own errors are logged by the error table."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        return kind is None or kind.__name__ != "ExecuteBatchError"


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


class Server:
    """The agentrun server process."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None) -> None:
        # The `_created` series double what go-grpc-prometheus dashboards expect to see, and no
        # panel uses them (process-wide: prometheus-client has no per-registry switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        grpc_log = logging.getLogger("grpc._cython.cygrpc")
        if not any(isinstance(f, _QuietGoneClients) for f in grpc_log.filters):
            grpc_log.addFilter(_QuietGoneClients())
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.port = 0
        self.otlp_port = 0
        self.metrics_port = 0
        self.health_port = 0
        self.web_port = 0
        self._console: WebConsole | None = None
        self._console_dir: tempfile.TemporaryDirectory[str] | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._storage: Storage | None = None
        self._grpc: grpc.aio.Server | None = None
        self._dispatcher: Dispatcher | None = None
        self._sweep: AbandonSweep | None = None
        self._backfill: FacetBackfill | None = None
        self._retention: RetentionSweep | None = None
        self._trace_finish: TraceFinishSweep | None = None
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
        if (
            config.web_port >= 0
            and config.auth == "none"
            and not is_loopback(config.web_host)
            and not config.insecure
        ):
            raise InvalidArgument(
                f"--web-host {config.web_host}: not a loopback address, and --auth none checks "
                "no credentials: every browser that reaches it could read every run and redrive "
                "or cancel any task. Pass --auth keys (the console then asks for a key), keep "
                "the console on 127.0.0.1 behind an authenticating proxy, or pass --insecure"
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
            OrchestratorServicer(
                storage, self._dispatcher, metrics, limit, config.work_limits, access
            ).add_to_server(server)
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
            self._backfill = FacetBackfill(storage)
            self._retention = RetentionSweep(
                storage, ingestion_metrics, config.limits.retention_sweep_seconds
            )
            otlp_metrics = OtlpMetrics(self.registry)
            for receiver in (OtlpTraceServicer, OtlpLogsServicer):
                receiver(storage, otlp_metrics, config.limits, access).add_to_server(server)
            self._trace_finish = TraceFinishSweep(
                storage,
                otlp_metrics,
                config.limits.otlp_quiet_seconds,
                config.limits.max_live_run_bytes,
            )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(
            KeyServicer(storage, self._keys.reload if self._keys else None), server
        )
        served = [
            *(_SERVICE_DESCRIPTORS[s] for s in config.services),
            *(_OTLP_SERVICES if "ingestion" in config.services else []),
            _KEY_SERVICE,
        ]
        names = [service.full_name for service in served]
        grpc_metrics.preregister([*served, health_pb2.DESCRIPTOR.services_by_name["Health"]])
        enable_reflection(
            server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        )
        self.port = await self._listen(server, "--port", config.port)
        if config.web_port >= 0:
            # The console's own way in: a Unix socket only this process's user can reach, with
            # no TLS to terminate; its calls carry the signed-in key like any client's.
            self._console_dir = tempfile.TemporaryDirectory(prefix="agentrun-console-")
            console_target = f"unix:{Path(self._console_dir.name) / 'grpc.sock'}"
            server.add_insecure_port(console_target)
        if config.otlp_port >= 0 and "ingestion" in config.services:
            self.otlp_port = await self._listen(server, "--otlp-port", config.otlp_port)
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
        if self._backfill is not None:
            self._backfill.start()
        if self._retention is not None:
            self._retention.start()
        if self._trace_finish is not None:
            self._trace_finish.start()
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
        if self._console_dir is not None:
            self._console = WebConsole(
                console_target,
                self._keys,
                config.services,
                config.grace_seconds,
            )
            try:
                await self._console.start(config.web_host, config.web_port)
            except InvalidArgument:
                await self.shutdown(0)
                raise
            self.web_port = self._console.port

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
    def web_url(self) -> str:
        """Where the web console is served; "" when it is not."""
        return self._console.url if self._console is not None else ""

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
        console, self._console = self._console, None
        if console is not None:
            await console.shutdown()
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
        backfill, self._backfill = self._backfill, None
        if backfill is not None:
            await backfill.stop()
        retention, self._retention = self._retention, None
        if retention is not None:
            await retention.stop()
        trace_finish, self._trace_finish = self._trace_finish, None
        if trace_finish is not None:
            await trace_finish.stop()
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
        console_dir, self._console_dir = self._console_dir, None
        if console_dir is not None:
            console_dir.cleanup()

    async def _listen(self, server: grpc.aio.Server, flag: str, port: int) -> int:
        """Bind `server` to `port` on the configured host (with TLS when configured); the port.

        Raises:
            InvalidArgument: the port is in use or not this machine's (the server shut down).
        """
        host = self.config.host
        address = f"{host}:{port}"
        bound = 0
        try:
            if not _in_use(host, port):
                if self.tls is not None:
                    bound = server.add_secure_port(address, self.tls.credentials())
                else:
                    bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            await self.shutdown(0)
            raise InvalidArgument(
                f"{flag}: cannot listen on {address}: in use (another agentrun serve?) or not "
                f"this machine's; pick another with {flag}, or 0 for any free one"
            )
        return bound

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
