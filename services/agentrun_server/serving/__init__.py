"""What both services share to serve: the error -> status table, gRPC metrics, /metrics."""

from __future__ import annotations

from agentrun_server.serving._background import Periodic, cancel_and_wait
from agentrun_server.serving._deadlines import IdleTimeout, receive
from agentrun_server.serving._grpc_metrics import GrpcServerMetrics, MetricsInterceptor
from agentrun_server.serving._handlers import add_service
from agentrun_server.serving._metrics import MetricsEndpoint, MetricsWebConfig
from agentrun_server.serving._paging import page_after, page_size
from agentrun_server.serving._reflection import enable_reflection
from agentrun_server.serving._slots import StreamSlots, peer_host
from agentrun_server.serving._status import STATUS_CODES, ErrorInterceptor, status_for
from agentrun_server.serving._wire import epoch_seconds, seconds_of, to_duration, to_timestamp

__all__ = [
    "STATUS_CODES",
    "ErrorInterceptor",
    "GrpcServerMetrics",
    "IdleTimeout",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "MetricsWebConfig",
    "Periodic",
    "StreamSlots",
    "add_service",
    "cancel_and_wait",
    "enable_reflection",
    "epoch_seconds",
    "page_after",
    "page_size",
    "peer_host",
    "receive",
    "seconds_of",
    "status_for",
    "to_duration",
    "to_timestamp",
]
