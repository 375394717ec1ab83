"""Checks of request fields at the edge, before anything is used or stored.

Each check raises InvalidArgument naming the field and the limit, and echoes the value cut short
(`shown`), so a 10 MB id never comes back in a status. The limits are the SDK's
(`agentrun.wire.limits`): what the SDK builds, the server accepts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration

from agentrun.wire.limits import (
    MAX_DESCRIPTION_BYTES,
    MAX_IDS_PER_REQUEST,
    MAX_NAME_BYTES,
    identifier_problem,
    name_problem,
    normalized_name,
    shown,
)
from agentrun_server._errors import InvalidArgument

MAX_INT64 = 2**63 - 1
MAX_DURATION_SECONDS = 315_576_000_000
"""google.protobuf.Duration's range (+-10,000 years)."""

T = TypeVar("T")


def check_name(field: str, value: str, *, nfc: bool = True) -> str:
    """A name (collection, run id, transcript key, worker): printable, 1 to MAX_NAME_BYTES bytes.
    Returns it in NFC, the form names are stored and compared in (`nfc=False` for ids, which
    compare as sent)."""
    if nfc:
        value = normalized_name(value)
    problem = name_problem(value)
    if problem is not None:
        raise InvalidArgument(f"{field}: {shown(value)}: {problem}")
    return value


def check_identifier(field: str, value: str) -> str:
    """A workflow, stage or pathway name being defined: `agentrun.wire.limits.IDENTIFIER_PATTERN`."""
    problem = identifier_problem(value)
    if problem is not None:
        raise InvalidArgument(f"{field}: {shown(value)}: {problem}")
    return value


def check_reference(field: str, value: str, *, required: bool = False) -> str:
    """A name or id that refers to something stored (looked up, never stored): at most
    MAX_NAME_BYTES bytes. Names are looked up in NFC."""
    if not value:
        if required:
            raise InvalidArgument(f"{field}: required")
        return value
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"{field}: {shown(value)}: {size:,} bytes, over the limit of {MAX_NAME_BYTES}"
        )
    if "\x00" in value:  # no name holds one, and PostgreSQL text cannot
        raise InvalidArgument(f"{field}: {shown(value)}: contains U+0000")
    return normalized_name(value)


def check_text(field: str, value: str, max_bytes: int = MAX_DESCRIPTION_BYTES) -> str:
    """Free text (a description): at most `max_bytes` bytes of UTF-8."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(f"{field}: {size:,} bytes, over the limit of {max_bytes:,}")
    if "\x00" in value:
        raise InvalidArgument(f"{field}: contains U+0000, which text cannot hold")
    return value


def storable_text(value: str) -> str:
    """Free text kept for display (a failure's error, a run's name column) with U+0000, which
    PostgreSQL text cannot hold, replaced by U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


MAX_LEASE_ID_CHARS = 64


def lease_id_problem(field: str, lease_id: str) -> str | None:
    """Why `lease_id` cannot be one this server issued (they are 32 hex digits), or None."""
    if len(lease_id) > MAX_LEASE_ID_CHARS or not lease_id.isprintable():
        return f"{field}: {shown(lease_id)} is not a lease id from this server"
    return None


def check_count(field: str, items: Sequence[T], limit: int = MAX_IDS_PER_REQUEST) -> Sequence[T]:
    """A list of at most `limit` items."""
    if len(items) > limit:
        raise InvalidArgument(f"{field}: {len(items):,} items, over the limit of {limit:,}")
    return items


def parse_id(text: str) -> int | None:
    """A task id (a decimal from 1 to 2^63-1) from its text, or None if it is not one."""
    if not text or len(text) > 19 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if 0 < value <= MAX_INT64 else None


def check_task_id(field: str, text: str) -> int:
    """A task id, required."""
    value = parse_id(text)
    if value is None:
        raise InvalidArgument(
            f"{field}: {shown(text)} is not a task id (a decimal from 1 to 2^63-1)"
        )
    return value


def check_task_ids(field: str, texts: Sequence[str]) -> list[int]:
    """A list of task ids, at most MAX_IDS_PER_REQUEST."""
    check_count(field, texts)
    return [check_task_id(f"{field}[{i}]", text) for i, text in enumerate(texts)]


def duration_problem(
    duration: Duration, minimum: float, maximum: float, *, open_min: bool
) -> str | None:
    """Why `duration` is not a valid Duration within the bounds (seconds), or None."""
    seconds, nanos = duration.seconds, duration.nanos
    if (
        not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS
        or not -999_999_999 <= nanos <= 999_999_999
        or (seconds > 0 > nanos)
        or (seconds < 0 < nanos)
    ):
        return f"not a valid google.protobuf.Duration (seconds={seconds}, nanos={nanos})"
    value = seconds + nanos / 1e9
    if value < minimum or (open_min and value == minimum):
        bound = "more than" if open_min else "at least"
        return f"{value:g} s; must be {bound} {minimum:g} s"
    if value > maximum:
        return f"{value:g} s, over the limit of {maximum:g} s"
    return None


def check_seconds(
    field: str, duration: Duration, minimum: float, maximum: float, *, open_min: bool = False
) -> float:
    """A Duration's length in seconds, within [minimum, maximum] ((minimum, maximum] with
    `open_min`)."""
    problem = duration_problem(duration, minimum, maximum, open_min=open_min)
    if problem is not None:
        raise InvalidArgument(f"{field}: {problem}")
    return duration.seconds + duration.nanos / 1e9


def check_enum(field: str, value: int, known: Sequence[int] | dict[int, object]) -> int:
    """An enum value this server knows."""
    if value not in known:
        raise InvalidArgument(f"{field}: {value} is not a known value")
    return value


def finite_seconds(value: float, low: float, high: float) -> float:
    """`value` clamped into [low, high] (NaN to low): for stored times, so a read never fails."""
    if math.isnan(value):
        return low
    return min(max(value, low), high)
