"""Time conversions at the wire edge: epoch seconds <-> Timestamp, seconds <-> Duration."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(seconds: float) -> Timestamp:
    """A Timestamp of epoch `seconds`."""
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def to_duration(seconds: float) -> Duration:
    """A Duration of `seconds`."""
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def seconds_of(duration: Duration) -> float:
    """The length of a Duration in seconds."""
    return float(duration.ToNanoseconds()) / 1e9
