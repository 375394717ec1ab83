"""agentrun: ingest LLM agent runs over gRPC and take them through workflows of stages.

The data model follows Docent's `AgentRun`; the writer follows Docent's `AgentRunWriter`; the
stage runner follows Encord's task `Runner`.

    import agentrun

    writer = agentrun.init(collection_name="airline", workflow="grading")
    writer.log_agent_runs(runs)
    summary = writer.finish()
"""

from __future__ import annotations

from agentrun import chat, importers
from agentrun._agent_run import AgentRun, AgentRunWithoutMetadataValidator, FilterableField
from agentrun._client import Client
from agentrun._connection import Connection
from agentrun._convert import (
    agent_run_from_proto,
    agent_run_to_proto,
    value_from_proto,
    value_to_proto,
)
from agentrun._errors import (
    AgentRunError,
    ConnectionConfigError,
    FormatError,
    InvalidRunError,
    RpcError,
    SpoolError,
    WorkflowError,
    WriterClosedError,
)
from agentrun._live_run import LiveRun, LiveRunError, RefusedEvent
from agentrun._metadata import BaseAgentRunMetadata, BaseMetadata
from agentrun._runner import Runner, RunSummary
from agentrun._stage import Fail, Retry, StageResult, TaskContext, TaskInput
from agentrun._transcript import Transcript
from agentrun._workflow import WorkflowSpec, load_workflow
from agentrun._writer import AgentRunWriter, RejectedRun, WriteSummary, init
from agentrun.importers import load_agent_runs

__version__ = "0.1.0"

__all__ = [
    "AgentRun",
    "AgentRunError",
    "AgentRunWithoutMetadataValidator",
    "AgentRunWriter",
    "BaseAgentRunMetadata",
    "BaseMetadata",
    "Client",
    "Connection",
    "ConnectionConfigError",
    "Fail",
    "FilterableField",
    "FormatError",
    "InvalidRunError",
    "LiveRun",
    "LiveRunError",
    "RefusedEvent",
    "RejectedRun",
    "Retry",
    "RpcError",
    "RunSummary",
    "Runner",
    "SpoolError",
    "StageResult",
    "TaskContext",
    "TaskInput",
    "Transcript",
    "WorkflowError",
    "WorkflowSpec",
    "WriteSummary",
    "WriterClosedError",
    "__version__",
    "agent_run_from_proto",
    "agent_run_to_proto",
    "chat",
    "importers",
    "init",
    "load_agent_runs",
    "load_workflow",
    "value_from_proto",
    "value_to_proto",
]
