"""The agentrun server: the ingestion and orchestrator services over shared storage.

    python -m agentrun_server serve     # or: agentrun serve

The two services share storage, serving and metrics code and never import each other; one process
can serve both (the default) or one of them, several processes sharing the database.
"""

from __future__ import annotations

from agentrun_server._config import SERVICES, ConnectionLimits, ServerConfig
from agentrun_server._errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from agentrun_server._server import Server
from agentrun_server.auth._tls import TlsConfig
from agentrun_server.ingestion import IngestionLimits
from agentrun_server.orchestrator import WorkLimits

__all__ = [
    "SERVICES",
    "AlreadyExists",
    "ConnectionLimits",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IngestionLimits",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Server",
    "ServerConfig",
    "ServerError",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "WorkLimits",
]
