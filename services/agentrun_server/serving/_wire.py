"""Time conversions at the wire edge: epoch seconds <-> Timestamp, seconds <-> Duration.

Values going out are clamped into the message's range (Timestamp: years 1 to 9999; Duration:
+-10,000 years), so that a stored value, however it got there, never makes a read fail.
"""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun_server._checks import MAX_DURATION_SECONDS, finite_seconds

_MIN_TIMESTAMP, _MAX_TIMESTAMP = -62_135_596_800, 253_402_300_799


def to_timestamp(seconds: float) -> Timestamp:
    """A Timestamp of epoch `seconds`."""
    ts = Timestamp()
    ts.FromNanoseconds(int(finite_seconds(seconds, _MIN_TIMESTAMP, _MAX_TIMESTAMP) * 1e9))
    return ts


def to_duration(seconds: float) -> Duration:
    """A Duration of `seconds`."""
    d = Duration()
    d.FromNanoseconds(
        int(finite_seconds(seconds, -MAX_DURATION_SECONDS, MAX_DURATION_SECONDS) * 1e9)
    )
    return d


def epoch_seconds(timestamp: Timestamp) -> float:
    """A Timestamp as epoch seconds."""
    return timestamp.seconds + timestamp.nanos / 1e9


def seconds_of(duration: Duration) -> float:
    """The length of a Duration in seconds (checked first with `_checks.check_seconds`)."""
    return duration.seconds + duration.nanos / 1e9
