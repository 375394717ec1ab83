"""The SDK's exceptions. One root, `AgentRunError`; transport failures are mapped once, in `RpcError`.

AgentRunError
├── RpcError        a call to the server failed (carries the gRPC status code)
├── FormatError     a file of runs or a workflow file cannot be read
├── WorkflowError   a workflow definition or a Runner's stages do not fit together
├── InvalidRunError     a run the server would refuse (logged to a writer, or stored by an importer)
├── WriterClosedError   runs logged to a writer after finish()
└── SpoolError      a writer's spool directory cannot be used (held by another writer, disk full)
"""

from __future__ import annotations

import grpc

from agentrun.wire.checks import InvalidRun


class AgentRunError(Exception):
    """Root of every error the agentrun SDK raises."""


class RpcError(AgentRunError):
    """A call to an agentrun server failed.

    Attributes:
        code: The gRPC status code.
        details: The server's message.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_grpc(cls, error: grpc.RpcError) -> RpcError:
        """Wrap a grpc error: a `grpc.Call` or a `grpc.aio.AioRpcError` carries the code and
        details (an AioRpcError is not a grpc.Call)."""
        if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
            return cls(error.code(), error.details() or "")
        return cls(grpc.StatusCode.UNKNOWN, str(error))


class FormatError(AgentRunError):
    """A file of runs or a workflow file cannot be read; the message names the file and record.

    Attributes:
        path: The file.
        record: Which record of the file ("record 3", "line 12", "samples/15_epoch_1.json"), or
            None when the file as a whole is at fault.
        field: The field at fault (e.g. "transcripts.default.messages.2.role"), if known.
    """

    def __init__(
        self, message: str, *, path: str = "", record: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.record = record
        self.field = field


class WorkflowError(AgentRunError):
    """A workflow definition is invalid, or a Runner's stages do not match the workflow."""


class InvalidRunError(AgentRunError, InvalidRun):
    """A run the server would refuse, found before it is sent: the checks the ingestion server
    applies (`agentrun.wire.checks`, whose `InvalidRun` this is too) also run in
    `AgentRunWriter.log_agent_runs`.

    Attributes:
        agent_run_id: The run's id (cut short when over the name limit).
        field: The field at fault, e.g. "transcripts[0].messages[3].role" or
            "metadata.fields['config']".
        reason: Why, e.g. "nested more than 20 levels deep (dicts and lists)".
    """

    @classmethod
    def of(cls, problem: InvalidRun) -> InvalidRunError:
        """The SDK's error for a problem the wire checks found."""
        return cls(problem.agent_run_id, problem.field, problem.reason)


class WriterClosedError(AgentRunError):
    """Runs were logged to an `AgentRunWriter` after `finish()`."""


class SpoolError(AgentRunError):
    """A writer's `spool_dir` cannot be used: another writer holds it, or the disk refused a write."""


class ConnectionConfigError(AgentRunError, ValueError):
    """A `Connection` cannot be used as given: an API key would go in plaintext to another
    machine, half a client certificate is given, or a TLS file cannot be read."""
