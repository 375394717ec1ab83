"""agentrun: ingest LLM agent runs over gRPC and take them through workflows of stages.

The data model follows Docent's `AgentRun`; the writer follows Docent's `AgentRunWriter`; the
stage runner follows Encord's task `Runner`.

    import agentrun

    writer = agentrun.init(collection_name="airline", workflow="grading")
    writer.log_agent_runs(runs)
    summary = writer.finish()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names load their modules when first used (PEP 562): `import agentrun` costs nothing
# more, and `import agentrun.v1` or `agentrun.wire` (what the server imports) loads no pydantic,
# tiktoken or rich, nor the writer's and Runner's metrics.
if TYPE_CHECKING:
    from agentrun import chat, importers, work
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
    from agentrun._records import (
        ApiKey,
        ApiKeyCreated,
        AttemptFailure,
        Collection,
        CollectionCreated,
        Deletion,
        LeaseHolder,
        RunEvent,
        RunUpdate,
        StageBacklog,
        Task,
        TaskState,
        Workflow,
        WorkflowApplied,
    )
    from agentrun._runner import Runner, RunSummary
    from agentrun._stage import Fail, Retry, StageResult, TaskContext, TaskInput
    from agentrun._transcript import Transcript
    from agentrun._workflow import WorkflowSpec, load_workflow
    from agentrun._writer import AgentRunWriter, RejectedRun, WriteSummary, init
    from agentrun.importers import load_agent_runs

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "AgentRun": "agentrun._agent_run",
    "AgentRunWithoutMetadataValidator": "agentrun._agent_run",
    "FilterableField": "agentrun._agent_run",
    "Client": "agentrun._client",
    "Connection": "agentrun._connection",
    "agent_run_from_proto": "agentrun._convert",
    "agent_run_to_proto": "agentrun._convert",
    "value_from_proto": "agentrun._convert",
    "value_to_proto": "agentrun._convert",
    "AgentRunError": "agentrun._errors",
    "ConnectionConfigError": "agentrun._errors",
    "FormatError": "agentrun._errors",
    "InvalidRunError": "agentrun._errors",
    "RpcError": "agentrun._errors",
    "SpoolError": "agentrun._errors",
    "WorkflowError": "agentrun._errors",
    "WriterClosedError": "agentrun._errors",
    "LiveRun": "agentrun._live_run",
    "LiveRunError": "agentrun._live_run",
    "RefusedEvent": "agentrun._live_run",
    "BaseAgentRunMetadata": "agentrun._metadata",
    "BaseMetadata": "agentrun._metadata",
    "ApiKey": "agentrun._records",
    "ApiKeyCreated": "agentrun._records",
    "AttemptFailure": "agentrun._records",
    "Collection": "agentrun._records",
    "CollectionCreated": "agentrun._records",
    "Deletion": "agentrun._records",
    "LeaseHolder": "agentrun._records",
    "RunEvent": "agentrun._records",
    "RunUpdate": "agentrun._records",
    "StageBacklog": "agentrun._records",
    "Task": "agentrun._records",
    "TaskState": "agentrun._records",
    "Workflow": "agentrun._records",
    "WorkflowApplied": "agentrun._records",
    "Runner": "agentrun._runner",
    "RunSummary": "agentrun._runner",
    "Fail": "agentrun._stage",
    "Retry": "agentrun._stage",
    "StageResult": "agentrun._stage",
    "TaskContext": "agentrun._stage",
    "TaskInput": "agentrun._stage",
    "Transcript": "agentrun._transcript",
    "WorkflowSpec": "agentrun._workflow",
    "load_workflow": "agentrun._workflow",
    "AgentRunWriter": "agentrun._writer",
    "RejectedRun": "agentrun._writer",
    "WriteSummary": "agentrun._writer",
    "init": "agentrun._writer",
    "load_agent_runs": "agentrun.importers",
    "chat": "",  # submodules
    "importers": "",
    "work": "",
}
"""Each public name, and the module that defines it ("" for a submodule of its own)."""

__all__ = [
    "AgentRun",
    "AgentRunError",
    "AgentRunWithoutMetadataValidator",
    "AgentRunWriter",
    "ApiKey",
    "ApiKeyCreated",
    "AttemptFailure",
    "BaseAgentRunMetadata",
    "BaseMetadata",
    "Client",
    "Collection",
    "CollectionCreated",
    "Connection",
    "ConnectionConfigError",
    "Deletion",
    "Fail",
    "FilterableField",
    "FormatError",
    "InvalidRunError",
    "LeaseHolder",
    "LiveRun",
    "LiveRunError",
    "RefusedEvent",
    "RejectedRun",
    "Retry",
    "RpcError",
    "RunEvent",
    "RunSummary",
    "RunUpdate",
    "Runner",
    "SpoolError",
    "StageBacklog",
    "StageResult",
    "Task",
    "TaskContext",
    "TaskInput",
    "TaskState",
    "Transcript",
    "Workflow",
    "WorkflowApplied",
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
    "work",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'agentrun' has no attribute {name!r}")
    value = importlib.import_module(f"agentrun.{name}") if module == "" else None
    if value is None:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
