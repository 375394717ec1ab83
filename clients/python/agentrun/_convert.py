"""Conversion between the pydantic models and their `agentrun.v1` wire form.

Lossless: model -> proto -> model gives an equal model with the same `.text`. Integers stay
integers (including those outside 64 bits), floats stay floats, strings keep NUL and non-BMP
characters, dict values keep their key order (tool-call arguments render in it); only the key
order of metadata is not kept (it renders sorted). Metadata declared by a subclass keeps its
descriptions on the wire; decoding rebuilds it as extras of `metadata_type` unless that type
declares the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

from agentrun._agent_run import AgentRun
from agentrun._metadata import DESCRIPTIONS_KEY, FROM_WIRE, BaseAgentRunMetadata, BaseMetadata
from agentrun.chat import (
    AssistantMessage,
    ChatMessage,
    ContentText,
    SystemMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from agentrun.v1 import agent_run_pb2 as pb

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# --- JSON-like values ---------------------------------------------------------------------------


def value_to_proto(value: Any, out: pb.Value) -> None:
    """Write a JSON-like Python value into `out`.

    Raises:
        TypeError: the value (or a nested one) is not None, bool, int, float, str, list, tuple or
            a dict with string keys.
    """
    # Exact types first (JSON-decoded values all are): one comparison where isinstance would
    # walk the chain below. Subclasses (IntEnum, OrderedDict, ...) take the chain.
    kind = type(value)
    if kind is str:
        out.string_value = value
    elif kind is dict:
        struct_to_proto(value, out.struct_value)
    elif kind is float:
        out.double_value = value
    elif kind is int and _INT64_MIN <= value <= _INT64_MAX:
        out.int_value = value
    elif kind is list:
        items = out.list_value
        items.SetInParent()
        add = items.values.add
        for item in value:
            value_to_proto(item, add())
    elif value is None:
        out.null_value = 0  # type: ignore[assignment]
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            out.int_value = value
        else:
            out.big_int_value = str(value)
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, list | tuple):
        items = out.list_value
        items.SetInParent()
        for item in value:
            value_to_proto(item, items.values.add())
    elif isinstance(value, Mapping):
        struct_to_proto(value, out.struct_value)
    else:
        raise TypeError(f"cannot encode a {type(value).__name__} as a JSON-like value: {value!r}")


def struct_to_proto(data: Mapping[str, Any], out: pb.StructValue) -> None:
    """Write a string-keyed dict into `out`."""
    out.SetInParent()
    add = out.fields.add
    for key, item in data.items():
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"dict keys must be strings, got {type(key).__name__}: {key!r}")
        field = add()  # then the key: upb's keyword initializer costs more than the assignment
        field.key = key
        value_to_proto(item, field.value)


def value_from_proto(value: pb.Value) -> Any:
    """Read a JSON-like Python value."""
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        return [value_from_proto(item) for item in value.list_value.values]
    if kind == "struct_value":
        return struct_from_proto(value.struct_value)
    if kind == "big_int_value":
        return int(value.big_int_value)
    return None


def struct_from_proto(struct: pb.StructValue) -> dict[str, Any]:
    """Read a string-keyed dict."""
    return {field.key: value_from_proto(field.value) for field in struct.fields}


# --- metadata -----------------------------------------------------------------------------------


def _metadata_to_proto(metadata: BaseMetadata, out: pb.Metadata, skip: str | None = None) -> None:
    out.SetInParent()
    out.require_field_descriptions = not metadata.allow_fields_without_descriptions
    descriptions = metadata.get_all_field_descriptions()
    for name, value in metadata.model_dump(mode="json", strip_internal_fields=True).items():
        if name == skip:
            continue
        field = out.fields[name]
        value_to_proto(value, field.value)
        if name in descriptions:
            field.declared = True
            description = descriptions[name]
            if description is not None:
                field.description = description


def _metadata_fields(message: pb.Metadata, **fields: Any) -> dict[str, Any]:
    """The fields a metadata model validates from (with the descriptions, as a JSON dump has)."""
    descriptions: dict[str, str | None] = {}
    # A protobuf map's items() is Python's Mapping mixin: walked only when there is something.
    for name, field in message.fields.items() if message.fields else ():
        fields[name] = value_from_proto(field.value)
        if field.declared:
            descriptions[name] = field.description if field.HasField("description") else None
    fields["allow_fields_without_descriptions"] = not message.require_field_descriptions
    if descriptions:  # taken in by model_post_init, as from a JSON dump
        fields[DESCRIPTIONS_KEY] = descriptions
    return fields


# --- messages -----------------------------------------------------------------------------------


def _tool_call_to_proto(call: ToolCall, out: pb.ToolCall) -> None:
    out.id = call.id
    out.function = call.function
    struct_to_proto(call.arguments, out.arguments)
    if call.type is not None:
        out.type = call.type
    if call.parse_error is not None:
        out.parse_error = call.parse_error
    if call.view is not None:
        if call.view.title is not None:
            out.view.title = call.view.title
        out.view.format = call.view.format
        out.view.content = call.view.content


def _tool_call_fields(call: pb.ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "function": call.function,
        "arguments": struct_from_proto(call.arguments),
        "type": call.type if call.HasField("type") else None,
        "parse_error": call.parse_error if call.HasField("parse_error") else None,
        "view": {
            "title": call.view.title if call.view.HasField("title") else None,
            "format": call.view.format,
            "content": call.view.content,
        }
        if call.HasField("view")
        else None,
    }


def message_to_proto(message: ChatMessage, out: pb.ChatMessage) -> None:
    """Write a chat message into `out`."""
    if message.id is not None:
        out.id = message.id
    if message.timestamp is not None:
        out.timestamp.FromDatetime(message.timestamp)
    if isinstance(message.content, str):
        out.text = message.content
    else:
        parts = out.parts
        parts.SetInParent()
        for part in message.content:
            content = parts.parts.add()
            if isinstance(part, ContentText):
                content.text.text = part.text
                if part.refusal is not None:
                    content.text.refusal = part.refusal
            else:
                content.reasoning.reasoning = part.reasoning
                if part.signature is not None:
                    content.reasoning.signature = part.signature
                content.reasoning.redacted = part.redacted
    # Each `out.<role>` read makes a wrapper object: one read per message.
    if isinstance(message, SystemMessage):
        out.system.SetInParent()
    elif isinstance(message, UserMessage):
        user = out.user
        user.SetInParent()
        if message.tool_call_id:
            user.tool_call_ids.extend(message.tool_call_id)
    elif isinstance(message, AssistantMessage):
        assistant = out.assistant
        assistant.SetInParent()
        if message.model is not None:
            assistant.model = message.model
        if message.tool_calls:
            add = assistant.tool_calls.add
            for call in message.tool_calls:
                _tool_call_to_proto(call, add())
    else:
        tool = out.tool
        tool.SetInParent()
        if message.tool_call_id is not None:
            tool.tool_call_id = message.tool_call_id
        if message.function is not None:
            tool.function = message.function
        if message.error is not None:
            struct_to_proto(message.error, tool.error)


_ROLE_CLASSES: dict[str, type[ChatMessage]] = {
    "system": SystemMessage,
    "user": UserMessage,
    "assistant": AssistantMessage,
    "tool": ToolMessage,
}


def message_from_proto(message: pb.ChatMessage) -> ChatMessage:
    """Read a chat message.

    Raises:
        ValueError: the message has no role.
    """
    fields = _message_fields(message)
    return _ROLE_CLASSES[fields["role"]].model_validate(fields, context=FROM_WIRE)


def _message_fields(message: pb.ChatMessage) -> dict[str, Any]:
    """The fields a chat message validates from, `role` telling its class.

    Raises:
        ValueError: the message has no role.
    """
    role = message.WhichOneof("role")
    if role is None:
        raise ValueError("chat message has no role")
    content: str | list[dict[str, Any]]
    if message.WhichOneof("content") == "parts":
        content = []
        for part in message.parts.parts:
            if part.WhichOneof("kind") == "reasoning":
                r = part.reasoning
                content.append(
                    {
                        "type": "reasoning",
                        "reasoning": r.reasoning,
                        "signature": r.signature if r.HasField("signature") else None,
                        "redacted": r.redacted,
                    }
                )
            else:
                t = part.text
                content.append(
                    {
                        "type": "text",
                        "text": t.text,
                        "refusal": t.refusal if t.HasField("refusal") else None,
                    }
                )
    else:
        content = message.text
    fields: dict[str, Any] = {"role": role, "content": content}
    if message.HasField("id"):
        fields["id"] = message.id
    if message.HasField("timestamp"):
        fields["timestamp"] = message.timestamp.ToDatetime(tzinfo=UTC)
    if role == "user":
        if message.user.tool_call_ids:
            fields["tool_call_id"] = list(message.user.tool_call_ids)
    elif role == "assistant":
        a = message.assistant
        if a.HasField("model"):
            fields["model"] = a.model
        if a.tool_calls:
            fields["tool_calls"] = [_tool_call_fields(c) for c in a.tool_calls]
    elif role == "tool":
        tool = message.tool
        if tool.HasField("tool_call_id"):
            fields["tool_call_id"] = tool.tool_call_id
        if tool.HasField("function"):
            fields["function"] = tool.function
        if tool.HasField("error"):
            fields["error"] = struct_from_proto(tool.error)
    return fields


# --- runs ---------------------------------------------------------------------------------------


def agent_run_to_proto(run: AgentRun) -> pb.AgentRun:
    """Convert a run to its wire form.

    Raises:
        TypeError: a metadata or tool-argument value is not JSON-like.
    """
    out = pb.AgentRun(id=run.id)
    if run.name is not None:
        out.name = run.name
    if run.description is not None:
        out.description = run.description
    for key, transcript in run.transcripts.items():
        t = out.transcripts.add(key=key, id=transcript.id)
        if transcript.name is not None:
            t.name = transcript.name
        if transcript.description is not None:
            t.description = transcript.description
        for message in transcript.messages:
            message_to_proto(message, t.messages.add())
        _metadata_to_proto(transcript.metadata, t.metadata)
    run_metadata_to_proto(run.metadata, out)
    return out


def score_to_proto(score: bool | int | float | None, out: pb.Score) -> None:
    """A score into its wire form; None leaves it unset."""
    if isinstance(score, bool):
        out.bool_value = score
    elif isinstance(score, int):
        out.int_value = score
    elif isinstance(score, float):
        out.double_value = score


def run_metadata_to_proto(metadata: BaseMetadata | Mapping[str, Any], out: pb.AgentRun) -> None:
    """A run's metadata into `out`: `scores` (a `BaseAgentRunMetadata`'s, or the key `scores` of
    Docent-style dict metadata) become the run's scores, every other field a metadata field.

    Raises:
        TypeError: a value is not JSON-like, or `scores` is not a mapping of numbers and bools.
    """
    if isinstance(metadata, BaseMetadata):
        for name, score in getattr(metadata, "scores", {}).items():
            score_to_proto(score, out.scores[name])
        _metadata_to_proto(metadata, out.metadata, skip="scores")
        return
    fields = dict(metadata)
    scores = fields.pop("scores", None) or {}
    if not isinstance(scores, Mapping) or not all(
        isinstance(v, bool | int | float) for v in scores.values()
    ):
        raise TypeError(f"metadata scores: a mapping of names to numbers or bools, not {scores!r}")
    for name, score in scores.items():
        score_to_proto(score, out.scores[name])
    out.metadata.SetInParent()
    for key, value in fields.items():
        value_to_proto(value, out.metadata.fields[key].value)


def score_from_proto(score: pb.Score) -> bool | int | float | None:
    kind = score.WhichOneof("kind")
    return None if kind is None else getattr(score, kind)


def agent_run_from_proto(
    message: pb.AgentRun,
    metadata_type: type[BaseAgentRunMetadata] = BaseAgentRunMetadata,
) -> AgentRun:
    """Convert a wire-form run back to the model.

    Args:
        message: The run.
        metadata_type: The metadata class to rebuild; fields it does not declare become extras.

    Raises:
        pydantic.ValidationError: the run does not validate (e.g. it has no transcript).
        ValueError: a chat message has no role.
    """
    # One validation of the whole run (pydantic's, in Rust), not one per nested model: each call
    # from Python into pydantic costs more than a small run's fields. With the FROM_WIRE
    # context: metadata's validator proves its values JSON-like by dumping them otherwise.
    metadata = _metadata_fields(
        message.metadata,
        scores={name: score_from_proto(s) for name, s in message.scores.items()}
        if message.scores
        else {},
    )
    return AgentRun.model_validate(
        {
            "id": message.id,
            "name": message.name if message.HasField("name") else None,
            "description": message.description if message.HasField("description") else None,
            "transcripts": {
                t.key: {
                    "id": t.id,
                    "name": t.name if t.HasField("name") else None,
                    "description": t.description if t.HasField("description") else None,
                    "messages": [_message_fields(m) for m in t.messages],
                    "metadata": _metadata_fields(t.metadata),
                }
                for t in message.transcripts
            },
            "metadata": metadata
            if metadata_type is BaseAgentRunMetadata
            else metadata_type.model_validate(metadata, context=FROM_WIRE),
        },
        context=FROM_WIRE,
    )
