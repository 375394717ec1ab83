"""The Prometheus /metrics endpoint of a service process."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    """http://host:port/metrics serving `registry` from a daemon thread, until `close()`."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        """Bind and start serving; port 0 binds a free port (see `port`).

        Raises:
            OSError: the port cannot be bound.
        """
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
