"""The upload request read straight off the wire: each run kept as the bytes the client sent.

grpc would otherwise decode the whole `UploadAgentRunsRequest` and the servicer re-encode every run
to store it. Walking the request's two top-level fields instead costs a few microseconds per run,
keeps the client's bytes (unknown fields from newer clients included), and leaves validation one
decode per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


@dataclass
class RawUpload:
    """One UploadAgentRunsRequest: the collection id and each run's encoded bytes."""

    collection_id: str = ""
    runs: list[memoryview] = field(default_factory=list)
    size: int = 0
    """Encoded size of the whole message, in bytes."""
    error: str | None = None
    """Why the message is malformed (the servicer answers INVALID_ARGUMENT), or None."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError past the end: truncated
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def decode_upload_request(data: bytes) -> RawUpload:
    """Split an encoded `UploadAgentRunsRequest` into its fields. Never raises: grpc would answer
    a deserializer's exception with INTERNAL, so a malformed message comes back with `error` set."""
    view = memoryview(data)
    upload = RawUpload(size=len(data))
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, pos = _varint(view, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == _WIRE_LEN:
                length, pos = _varint(view, pos)
                if pos + length > end:
                    raise ValueError("a length-delimited field runs past the end")
                if number == 1:
                    upload.collection_id = bytes(view[pos : pos + length]).decode()
                elif number == 2:
                    upload.runs.append(view[pos : pos + length])
                pos += length
            elif wire_type == _WIRE_VARINT:
                _, pos = _varint(view, pos)
            elif wire_type == _WIRE_I64:
                pos += 8
            elif wire_type == _WIRE_I32:
                pos += 4
            else:
                raise ValueError(f"field {number} has unsupported wire type {wire_type}")
        if pos != end:
            raise ValueError("a fixed-width field runs past the end")
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        reason = "truncated" if isinstance(exc, IndexError) else str(exc)
        upload.error = f"UploadAgentRunsRequest: malformed message: {reason}"
    return upload
