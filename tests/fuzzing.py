"""Malformed messages from valid ones, with a fixed seed: raw-byte mutations and field mutations.

Byte mutations exercise decoding (truncations, bad varints, wrong wire types, bad UTF-8); field
mutations keep the message decodable and put extreme values in its fields (huge and negative
numbers, unknown enum values, long, empty and control-character strings, out-of-range durations),
which is where validation has to hold.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

from google.protobuf import descriptor
from google.protobuf.message import Message

FieldDescriptor = descriptor.FieldDescriptor

_INTS = (0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1, 2**63 - 1, -(2**63))
_STRINGS = (
    "",
    "x" * 300,
    "y" * 70_000,
    "\x00",
    "\x1b[31mred\x1b[0m",
    "\u202eevil",
    "cafe\u0301",
    "99999999999999999999999",
    "-1",
    "0",
    "1",
    "9223372036854775807",
    "\U0001f600",
    " ",
)
_DOUBLES = (0.0, -1.0, 1e308, float("inf"), float("-inf"), float("nan"), 5e-324)

_INT_TYPES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to three random byte-level edits."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(7)
        at = rng.randrange(len(out) + 1)
        if choice == 0 and out:  # flip a byte
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1:  # truncate
            del out[at:]
        elif choice == 2:  # insert random bytes
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 3:  # an overlong varint
            out[at:at] = b"\xff" * rng.randint(5, 11)
        elif choice == 4:  # duplicate a span (repeated fields, overlapping lengths)
            span = out[at : at + rng.randint(1, 32)]
            out[at:at] = span
        elif choice == 5 and out:  # a byte to an extreme
            out[min(at, len(out) - 1)] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        else:  # garbage
            out = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(out)


def _fields(message: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every (message, field) pair reachable through set submessages, the top one included."""
    found: list[tuple[Message, FieldDescriptor]] = []
    stack = [message]
    while stack:
        current = stack.pop()
        for field in current.DESCRIPTOR.fields:
            found.append((current, field))
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            value = getattr(current, field.name)
            if field.is_repeated:
                if field.message_type.GetOptions().map_entry:
                    continue
                stack.extend(value)
            elif current.HasField(field.name):
                stack.append(value)
    return found


def _scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    kind = field.type
    if kind in _INT_TYPES:
        low, high = _INT_TYPES[kind]
        return rng.choice([v for v in _INTS if low <= v <= high] + [low, high])
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([-1, 99, 2**31 - 1, *field.enum_type.values_by_number])
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(_DOUBLES)
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 64))
    return rng.choice(_STRINGS)


def mutate_fields(message: Message, rng: random.Random) -> bytes:
    """A copy of `message`, one to four of its fields set to extreme values, encoded."""
    copy = type(message)()
    copy.CopyFrom(message)
    for _ in range(rng.randint(1, 4)):
        fields = [
            (m, f)
            for m, f in _fields(copy)
            if f.type != FieldDescriptor.TYPE_MESSAGE
            or f.message_type.full_name.startswith(
                "google.protobuf.D"  # Duration: mutated through its two scalar fields
            )
        ]
        if not fields:
            return mutate_bytes(copy.SerializeToString(), rng)
        owner, field = rng.choice(fields)
        if field.type == FieldDescriptor.TYPE_MESSAGE:  # a Duration
            duration = getattr(owner, field.name)
            if field.is_repeated:
                continue
            duration.seconds = rng.choice(
                (-(2**63), -1, 0, 2**31, 10**12, 315_576_000_000, 2**63 - 1)
            )
            duration.nanos = rng.choice((0, -1, 999_999_999, 2**31 - 1))
            continue
        if field.is_repeated:
            values = getattr(owner, field.name)
            for _ in range(rng.choice((1, 2, 50))):
                with contextlib.suppress(ValueError, TypeError):
                    values.append(_scalar(field, rng))
            continue
        with contextlib.suppress(ValueError, TypeError):  # e.g. an enum value it refuses
            setattr(owner, field.name, _scalar(field, rng))
    return copy.SerializeToString()


def malformed(message: Message, rng: random.Random) -> bytes:
    """One malformed variant of `message`: a byte mutation or a field mutation, half each."""
    if rng.random() < 0.5:
        return mutate_bytes(message.SerializeToString(), rng)
    return mutate_fields(message, rng)
