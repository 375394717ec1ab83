"""The server's exceptions: one root, each class naming the gRPC status it becomes.

Storage and services raise these; `serving` maps them to statuses in one table, so a handler never
builds a status by hand.
"""

from __future__ import annotations


class ServerError(Exception):
    """Root of the errors the agentrun server raises on purpose.

    Attributes:
        retry_after_seconds: When set, the client may retry after this long; the status carries it
            as a google.rpc.RetryInfo detail (AIP-193), which the SDK's writer honours.
    """

    retry_after_seconds: float | None = None


class InvalidArgument(ServerError):
    """The request is malformed; the message names the field and, where one applies, the limit."""


class Unauthenticated(ServerError):
    """The call carries no credentials the server knows: no key, an unknown or revoked one."""


class PermissionDenied(ServerError):
    """The caller is known but its key lacks the scope, or the collection or workflow, the call
    needs; the message names what is needed."""


class NotFound(ServerError):
    """The named collection, run, workflow, stage or task does not exist."""


class AlreadyExists(ServerError):
    """The resource exists already and the request cannot be taken as a repeat."""


class FailedPrecondition(ServerError):
    """The request conflicts with the current state (e.g. a collection bound to another workflow)."""


class Aborted(ServerError):
    """A concurrent change conflicts with the request: a sequencer check failed (another event
    holds the sequence number). Resending the same request cannot succeed; the client must
    re-read what is stored and continue from there."""


class ResourceExhausted(ServerError):
    """A limit was reached; the message names it. With `retry_after_seconds` the limit is a
    momentary one (back-pressure) and the request may be sent again after that long."""

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class DeadlineExceeded(ServerError):
    """A limit on time ran out (e.g. an upload stream idle for too long)."""


class Unavailable(ServerError):
    """The server cannot serve now (draining, storage busy); retry after `retry_after_seconds`."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
