"""Which failed calls to retry, and how long to wait: jittered exponential backoff that yields to the
server's google.rpc.RetryInfo (AIP-193), as gRPC clients of Google APIs do.
"""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Retried whether or not the server says when: the call may not have reached the server, or it
# gave up on it for reasons that pass (AIP-194). Resending runs is safe: their ids are idempotency
# keys.
_ALWAYS_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
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
        """Read a grpc error (a `grpc.Call` carries code, details and trailers)."""
        if not isinstance(error, grpc.Call):
            return cls(grpc.StatusCode.UNKNOWN, str(error), None)
        return cls(error.code(), error.details() or "", retry_delay_seconds(error))

    @property
    def verdict(self) -> Verdict:
        """RETRY for transient statuses and for any status carrying RetryInfo (e.g.
        RESOURCE_EXHAUSTED as back-pressure); SPLIT for a message over a limit; else GIVE_UP."""
        if self.retry_after_seconds is not None or self.code in _ALWAYS_RETRYABLE:
            return Verdict.RETRY
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
