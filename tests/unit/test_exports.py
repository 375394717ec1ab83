"""The public surface, pinned: `agentrun`'s and `agentrun_server`'s names are exactly these, each
resolves, and importing `agentrun` (or the contract, `agentrun.v1` and `agentrun.wire`) loads
nothing heavy until a name is used (PEP 562)."""

from __future__ import annotations

import json
import subprocess
import sys

import agentrun
import agentrun_server

SDK = {
    "ApiKey",
    "ApiKeyCreated",
    "AttemptFailure",
    "Collection",
    "CollectionCreated",
    "Deletion",
    "RunEvent",
    "RunUpdate",
    "StageBacklog",
    "Task",
    "TaskState",
    "Workflow",
    "WorkflowApplied",
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
    "LeaseHolder",
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
    "work",
}
SERVER = {
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
}
HEAVY = ("pydantic", "tiktoken", "rich", "yaml", "prometheus_client")


def test_the_public_names_are_exactly_these_and_each_resolves() -> None:
    assert set(agentrun.__all__) == SDK
    assert set(agentrun_server.__all__) == SERVER
    for name in agentrun.__all__:
        assert getattr(agentrun, name) is not None, name
    assert set(dir(agentrun)) >= SDK
    assert agentrun.InvalidRunError.__module__ == "agentrun._errors"


def _loaded_after(statement: str) -> list[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_importing_agentrun_or_the_contract_loads_nothing_heavy() -> None:
    for statement in ("import agentrun", "import agentrun.v1", "import agentrun.wire"):
        loaded = _loaded_after(statement)
        heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
        sdk = [m for m in loaded if m.startswith("agentrun._")]
        assert (heavy, sdk) == ([], []), statement
    # A name used loads what it needs.
    assert "pydantic" in _loaded_after("import agentrun; agentrun.AgentRun")
