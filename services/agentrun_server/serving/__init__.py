"""What both services share to serve: the error -> status table and the metrics endpoint."""

from __future__ import annotations

from agentrun_server.serving._metrics import start_metrics_server
from agentrun_server.serving._paging import page_after, page_size
from agentrun_server.serving._status import STATUS_CODES, ErrorInterceptor, status_for
from agentrun_server.serving._wire import seconds_of, to_duration, to_timestamp

__all__ = [
    "STATUS_CODES",
    "ErrorInterceptor",
    "page_after",
    "page_size",
    "seconds_of",
    "start_metrics_server",
    "status_for",
    "to_duration",
    "to_timestamp",
]
