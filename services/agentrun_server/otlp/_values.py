"""Values between OTLP's `AnyValue` and agentrun's `Value`, through plain Python data."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.proto.common.v1 import common_pb2

from agentrun.v1 import agent_run_pb2 as run_pb

Attributes = dict[str, Any]


def from_any(value: common_pb2.AnyValue) -> Any:
    """An AnyValue as Python data (bytes as their hex)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "array_value":
        return [from_any(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: from_any(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return None


def attributes(pairs: Iterable[common_pb2.KeyValue]) -> Attributes:
    """Key-value pairs as a dict (a repeated key: the last)."""
    return {kv.key: from_any(kv.value) for kv in pairs}


def json_or_value(value: Any) -> Any:
    """A GenAI content attribute: structured already, or a JSON string (SDKs cannot set
    structured attributes on spans yet); a string that is not JSON stays a string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def to_value(data: Any, out: run_pb.Value) -> None:
    """Python data (JSON-like) into `out`; anything else as its text."""
    if data is None:
        out.null_value = 0  # type: ignore[assignment]  # NullValue.NULL_VALUE
    elif isinstance(data, bool):
        out.bool_value = data
    elif isinstance(data, int):
        if -(2**63) <= data < 2**63:
            out.int_value = data
        else:
            out.big_int_value = str(data)
    elif isinstance(data, float):
        if math.isfinite(data):
            out.double_value = data
        else:
            out.string_value = str(data)
    elif isinstance(data, str):
        out.string_value = data
    elif isinstance(data, Mapping):
        struct = out.struct_value
        struct.SetInParent()
        for key, item in data.items():
            to_value(item, struct.fields.add(key=str(key)).value)
    elif isinstance(data, list | tuple):
        listed = out.list_value
        listed.SetInParent()
        for item in data:
            to_value(item, listed.values.add())
    else:
        out.string_value = str(data)


def to_struct(data: Mapping[str, Any], out: run_pb.StructValue) -> None:
    """A mapping into a StructValue."""
    out.SetInParent()
    for key, item in data.items():
        to_value(item, out.fields.add(key=str(key)).value)


def text_of(data: Any) -> str:
    """Content as text: a string as is, anything else as compact JSON."""
    if isinstance(data, str):
        return data
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)
