"""Protobuf base-128 varints: the lengths in encoded upload requests and in spool segments."""

from __future__ import annotations


def encode_varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf varint."""
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
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


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
