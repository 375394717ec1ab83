"""Status codes in answers that carry one per item (a settle's `Ack.code`, a live run event's
`AgentRunEventAck.code`): gRPC's canonical codes as numbers, readable without a gRPC library."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC's canonical status codes (google.rpc.Code), by number."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_name(number: int) -> str:
    """The name of a code ("FAILED_PRECONDITION"), or the number itself for one not known."""
    try:
        return Code(number).name
    except ValueError:
        return str(number)
