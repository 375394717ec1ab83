"""The Prometheus /metrics endpoint of a service process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> int:
    """Serve `registry` on http://host:port/metrics in a daemon thread; return the bound port.

    Port 0 binds a free port.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
