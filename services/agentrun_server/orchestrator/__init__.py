"""The orchestrator service: workflows of stages, tasks leased to stage workers over Work streams."""

from __future__ import annotations

from agentrun_server.orchestrator._dispatcher import RESUME_GRACE_SECONDS, Dispatcher
from agentrun_server.orchestrator._metrics import OrchestratorMetrics, backlog_collector
from agentrun_server.orchestrator._servicer import OrchestratorServicer, WorkLimits

__all__ = [
    "RESUME_GRACE_SECONDS",
    "Dispatcher",
    "OrchestratorMetrics",
    "OrchestratorServicer",
    "WorkLimits",
    "backlog_collector",
]
