"""Messages framed by hand, where the generated code would decode and re-encode what is already
encoded: an upload request from encoded runs (the writer) and back into them (the server), a live
run events request from encoded events, a Work stream's lease batch from the stored runs (the
server); and the protobuf varint, which also frames the SDK's spool files.
`tests/unit/test_wire.py` holds each to the generated classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_RUNS_FIELD = b"\x12"  # UploadAgentRunsRequest.agent_runs: field 2, length-delimited
_COLLECTION_FIELD = b"\x0a"  # UploadAgentRunsRequest.collection_id: field 1, length-delimited
_EVENTS_FIELD = b"\x0a"  # StreamAgentRunEventsRequest.events: field 1, length-delimited
_LEASES_FIELD = b"\x12"  # WorkResponse.leases (a LeaseBatch): field 2, length-delimited
_LEASE_FIELD = b"\x0a"  # LeaseBatch.leases: repeated field 1, length-delimited
_LEASE_RUN_FIELD = b"\x3a"  # Lease.agent_run: field 7, length-delimited
_LEASE_INPUT_FIELD = b"\x52"  # Lease.input: field 10, length-delimited
_SHORT_VARINTS = [bytes([n]) for n in range(0x80)]


def encode_varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf varint."""
    if value < 0x80:
        return _SHORT_VARINTS[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it.

    Raises:
        ValueError: the data ends inside the varint, or it is longer than 10 bytes.
    """
    value = shift = 0
    try:
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7
            if shift > 63:
                raise ValueError("varint longer than 10 bytes")
    except IndexError:
        raise ValueError("truncated") from None


def split_records(data: bytes, pos: int) -> tuple[list[bytes], bool]:
    """The length-delimited records (a varint length, then the bytes) from `pos` to the end of
    `data`, and whether the data ends inside one (torn: the whole records before it are kept)."""
    records: list[bytes] = []
    while pos < len(data):
        try:
            length, start = read_varint(data, pos)
        except ValueError:
            return records, True
        if start + length > len(data):
            return records, True
        records.append(data[start : start + length])
        pos = start + length
    return records, False


def encode_upload_request(collection_id: bytes, runs: Iterable[bytes]) -> bytes:
    """An encoded `UploadAgentRunsRequest` from already-encoded runs, without decoding them: a
    message is the concatenation of its fields, here field 1 (collection_id) and repeated field
    2 (agent_runs), both length-delimited."""
    parts = [_COLLECTION_FIELD, encode_varint(len(collection_id)), collection_id]
    for run in runs:
        parts += (_RUNS_FIELD, encode_varint(len(run)), run)
    return b"".join(parts)


def encode_events_request(events: Iterable[bytes]) -> bytes:
    """An encoded `StreamAgentRunEventsRequest` from already-encoded `AgentRunEvent`s (its
    repeated field 1)."""
    parts: list[bytes] = []
    for event in events:
        parts += (_EVENTS_FIELD, encode_varint(len(event)), event)
    return b"".join(parts)


def encode_lease_batch(leases: Iterable[tuple[bytes, bytes, bytes | None]]) -> bytes:
    """An encoded `WorkResponse` holding a `LeaseBatch`, from each lease's encoded fields other
    than its run and input (a `Lease` without them), its encoded `AgentRun`, and its encoded
    input `Value` or None: the runs are copied in as stored, never decoded and encoded again
    (a tau-bench run's round trip through the generated classes cost 15 - 35 us per lease). A
    message is the concatenation of its fields, in any order."""
    entries: list[bytes] = []
    for head, run, task_input in leases:
        parts = [head, _LEASE_RUN_FIELD, encode_varint(len(run)), run]
        if task_input:
            parts += (_LEASE_INPUT_FIELD, encode_varint(len(task_input)), task_input)
        lease = b"".join(parts)
        entries += (_LEASE_FIELD, encode_varint(len(lease)), lease)
    batch = b"".join(entries)
    return b"".join((_LEASES_FIELD, encode_varint(len(batch)), batch))


@dataclass
class RawUpload:
    """One UploadAgentRunsRequest: the collection id and each run's encoded bytes."""

    collection_id: str = ""
    runs: list[memoryview] = field(default_factory=list)
    size: int = 0
    """Encoded size of the whole message, in bytes."""
    error: str | None = None
    """Why the message is malformed (the server answers INVALID_ARGUMENT), or None."""


def decode_upload_request(data: bytes) -> RawUpload:
    """Split an encoded `UploadAgentRunsRequest` into its fields, each run kept as the bytes the
    client sent (unknown fields of newer clients included): a few microseconds per run, where
    decoding the request and encoding each run again to store it would cost a decode and an
    encode. Never raises: a malformed message comes back with `error` set (a gRPC deserializer's
    exception would be answered INTERNAL)."""
    view = memoryview(data)
    upload = RawUpload(size=len(data))
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, pos = read_varint(view, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == _WIRE_LEN:
                length, pos = read_varint(view, pos)
                if pos + length > end:
                    raise ValueError("a length-delimited field runs past the end")
                if number == 1:
                    upload.collection_id = bytes(view[pos : pos + length]).decode()
                elif number == 2:
                    upload.runs.append(view[pos : pos + length])
                pos += length
            elif wire_type == _WIRE_VARINT:
                _, pos = read_varint(view, pos)
            elif wire_type == _WIRE_I64:
                pos += 8
            elif wire_type == _WIRE_I32:
                pos += 4
            else:
                raise ValueError(f"field {number} has unsupported wire type {wire_type}")
        if pos != end:
            raise ValueError("a fixed-width field runs past the end")
    except (ValueError, UnicodeDecodeError) as exc:
        upload.error = f"UploadAgentRunsRequest: malformed message: {exc}"
    return upload
