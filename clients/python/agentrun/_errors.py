"""The SDK's exceptions. One root, `AgentRunError`; transport failures are mapped once, in `RpcError`.

AgentRunError
├── RpcError        a call to the server failed (carries the gRPC status code)
├── FormatError     a file of runs or a workflow file cannot be read
├── WorkflowError   a workflow definition or a Runner's stages do not fit together
├── WriterClosedError   runs logged to a writer after finish()
└── SpoolError      a writer's spool directory cannot be used (held by another writer, disk full)
"""

from __future__ import annotations

import grpc


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
        """Wrap a grpc error (a `grpc.Call` carries the code and details)."""
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return cls(code, details or "")


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


class WriterClosedError(AgentRunError):
    """Runs were logged to an `AgentRunWriter` after `finish()`."""


class SpoolError(AgentRunError):
    """A writer's `spool_dir` cannot be used: another writer holds it, or the disk refused a write."""
