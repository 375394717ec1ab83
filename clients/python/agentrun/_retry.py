"""The one retry policy of the SDK: which failed calls to retry, and how long to wait. Jittered
exponential backoff that yields to the server's google.rpc.RetryInfo (AIP-193), as gRPC clients of
Google APIs do. Every retry loop reads a failure once (`Failure.of`) and follows its `verdict`: the
writer's uploads, live runs' event stream and the Work stream.
"""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
"""Retried whether or not the server says when: the call may not have reached the server, or it
gave up on it for reasons that pass (AIP-194). Resending is safe: runs' ids and events' sequence
numbers are idempotency keys, and a settle repeated under its lease is answered as the first."""
REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Codes another attempt is answered the same: the request is wrong, its caller may not make it
(a key unknown, revoked or expired), or the server has no such method."""
# gRPC's own wording when a message exceeds a max message length, on either side.
_TOO_LARGE = re.compile(r"larger than max|message too large|max_runs_per_message", re.IGNORECASE)


class Verdict(enum.Enum):
    """What to do about a failed call."""

    RETRY = "retry"
    """Send the same request again after a delay."""
    SPLIT = "split"
    """The request is over a size or count limit: send its halves instead."""
    GIVE_UP = "give_up"
    """Retrying cannot help (invalid, not found, permission denied, a hard limit)."""


@dataclass(frozen=True)
class Failure:
    """A failed call, read once: its code, details and the server's retry delay (if any)."""

    code: grpc.StatusCode
    details: str
    retry_after_seconds: float | None

    @classmethod
    def of(cls, error: grpc.RpcError) -> Failure:
        """Read a grpc error: a `grpc.Call` (synchronous calls) or a `grpc.aio.AioRpcError`,
        each with code, details and trailers."""
        if not callable(getattr(error, "code", None)):
            return cls(grpc.StatusCode.UNKNOWN, str(error), None)
        call: grpc.Call = error  # type: ignore[assignment]  # or an AioRpcError: the same calls
        return cls(call.code(), call.details() or "", retry_delay_seconds(call))

    def verdict(self, *, stream: bool = False) -> Verdict:
        """What to do about the failure.

        - RETRY when the server says when (RetryInfo, whatever the code: RESOURCE_EXHAUSTED as
          back-pressure, UNAVAILABLE while storage is full), and for the TRANSIENT codes.
        - SPLIT a request over a size or count limit (a unary call: a stream's messages are
          refused one by one).
        - A `stream` (a long-lived call that reconnects) also retries every code but the REFUSED
          ones: a server killed mid-write can end a stream INTERNAL or UNKNOWN (grpc/grpc#36066),
          and RESOURCE_EXHAUSTED ends one over a cap on streams, freed when another closes.
        - GIVE_UP otherwise: a unary call is not retried on INTERNAL, UNKNOWN or
          RESOURCE_EXHAUSTED without RetryInfo (a hard limit), nor a refusal anywhere.
        """
        if self.retry_after_seconds is not None or self.code in TRANSIENT:
            return Verdict.RETRY
        if stream:
            return Verdict.GIVE_UP if self.code in REFUSED else Verdict.RETRY
        if self.code in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.INVALID_ARGUMENT,
        ) and _TOO_LARGE.search(self.details):
            return Verdict.SPLIT
        return Verdict.GIVE_UP

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


def retry_delay_seconds(call: grpc.Call) -> float | None:
    """The RetryInfo delay in a call's `grpc-status-details-bin` trailer, or None."""
    for key, value in call.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return info.retry_delay.ToMilliseconds() / 1000
    return None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter, capped; a server-given delay wins over the schedule.

    Attributes:
        initial_seconds: The first delay.
        max_seconds: No delay is longer (a server-given one excepted).
        multiplier: Growth per attempt.
        jitter: Fraction of the delay drawn at random, so clients that failed together spread out.
    """

    initial_seconds: float = 0.25
    max_seconds: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, server_seconds: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (from 1). A server-given delay is waited
        in full, plus up to `jitter` of it: never sooner than told."""
        if server_seconds is not None:
            return server_seconds * (1 + random.uniform(0, self.jitter))
        base = min(self.max_seconds, self.initial_seconds * self.multiplier ** max(0, attempt - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)
