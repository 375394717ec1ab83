"""What one OTLP span says of an agent's run: its messages, its tool result, its usage; the
mapping from the conventions agents are traced with, written once.

Read, first found (the README's table):

- **GenAI semantic conventions**, current: `gen_ai.system_instructions`, `gen_ai.input.messages`
  and `gen_ai.output.messages` (JSON strings or structured values) of `{role, parts}` messages with
  parts `text`, `reasoning`, `tool_call` and `tool_call_response` (its result in `response`, or
  `result`); an `execute_tool` span's `gen_ai.tool.call.id`, `gen_ai.tool.name` and
  `gen_ai.tool.call.result`; `gen_ai.agent.name`; usage, model, provider.
- **GenAI, older**: span events `gen_ai.system.message`, `gen_ai.user.message`,
  `gen_ai.assistant.message`, `gen_ai.tool.message`, `gen_ai.choice`; OpenLLMetry's flattened
  `gen_ai.prompt.N.*` and `gen_ai.completion.N.*`.
- **OpenInference** (Arize Phoenix, OpenLLMetry users): `llm.input_messages.N.message.*`,
  `llm.output_messages.N.message.*` with `tool_calls.N.tool_call.*`; TOOL spans' `tool.name` and
  `output.value`; `llm.token_count.*`, `llm.model_name`, `llm.provider`; `agent.name`.

A span with none of these (a plain span) says only its name, duration and status.

An agent, or a converter of runs to spans, may also say what the run and its transcripts carry
besides messages: `agentrun.run.name`, `.description`, `.metadata`, `.metadata_descriptions`
and `.scores` (JSON objects) on any span, `agentrun.transcript.name`, `.description`,
`.metadata` and `.metadata_descriptions` on an agent span, and a tool call's `view` (`{title,
format, content}`, as Inspect shows calls) in its `tool_call` part.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.proto.trace.v1 import trace_pb2

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun_server.otlp._values import Attributes, attributes, json_or_value, text_of, to_struct

STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR

CHAT_OPERATIONS = {"chat", "text_completion", "generate_content"}
AGENT_OPERATIONS = {"invoke_agent", "create_agent", "invoke_workflow"}


@dataclass
class SpanView:
    """One span, as a run sees it."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    kind: str
    """"chat" (a model call), "agent", "tool", or "other" (a plain span)."""
    agent: str = ""
    """The agent the span names (`gen_ai.agent.name`, `agent.name`)."""
    messages: list[run_pb.ChatMessage] = field(default_factory=list)
    """A model call's whole conversation, in order: instructions, input, output."""
    tool_result: run_pb.ChatMessage | None = None
    model: str = ""
    provider: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    service: str = ""
    """The `service.name` of the resource that sent it."""
    run_fields: dict[str, Any] = field(default_factory=dict)
    """What `agentrun.run.*` attributes say of the run: name, description, metadata, scores."""
    transcript_fields: dict[str, Any] = field(default_factory=dict)
    """What an agent span's `agentrun.transcript.*` attributes say of its transcript: name,
    description, metadata."""

    @property
    def root(self) -> bool:
        return not self.parent_id


def _timestamp(ns: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def _message(
    role: str,
    texts: Sequence[str] = (),
    reasoning: Sequence[str] = (),
    tool_calls: Sequence[Mapping[str, Any]] = (),
    *,
    tool_call_id: str = "",
    function: str = "",
    model: str = "",
    at_ns: int = 0,
) -> run_pb.ChatMessage:
    message = run_pb.ChatMessage()
    if role == "system":
        message.system.SetInParent()
    elif role == "assistant":
        message.assistant.SetInParent()
        if model:
            message.assistant.model = model
        for call in tool_calls:
            made = message.assistant.tool_calls.add(
                id=str(call.get("id") or ""), function=str(call.get("name") or "")
            )
            view = call.get("view")  # agentrun's own: how the call is shown (Inspect's views)
            if isinstance(view, Mapping) and "content" in view:
                if view.get("title") is not None:
                    made.view.title = str(view["title"])
                made.view.format = str(view.get("format") or "text")
                made.view.content = str(view["content"])
            arguments = json_or_value(call.get("arguments"))
            if isinstance(arguments, Mapping):
                to_struct(arguments, made.arguments)
            elif arguments not in (None, ""):
                made.parse_error = f"arguments are not a JSON object: {text_of(arguments)[:1000]}"
                made.arguments.SetInParent()
            else:
                made.arguments.SetInParent()
    elif role == "tool":
        message.tool.SetInParent()
        if tool_call_id:
            message.tool.tool_call_id = tool_call_id
        if function:
            message.tool.function = function
    else:
        message.user.SetInParent()
    if reasoning:
        for thought in reasoning:
            message.parts.parts.add().reasoning.reasoning = thought
        for text in texts:
            message.parts.parts.add().text.text = text
    else:
        message.text = "\n".join(texts)
    if at_ns:
        message.timestamp.CopyFrom(_timestamp(at_ns))
    return message


def _genai_messages(data: Any, *, model: str, at_ns: int) -> list[run_pb.ChatMessage]:
    """`gen_ai.*.messages` (or `system_instructions`, a list of parts) as messages."""
    data = json_or_value(data)
    if not isinstance(data, list):
        return []
    out: list[run_pb.ChatMessage] = []
    for item in data:
        if not isinstance(item, Mapping):
            continue
        role = str(item.get("role") or "user")
        parts = item.get("parts")
        if parts is None and "content" in item:  # the older {role, content} shape
            parts = [{"type": "text", "content": item.get("content")}]
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[Mapping[str, Any]] = []
        results: list[Mapping[str, Any]] = []
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "text":
                texts.append(text_of(part.get("content", "")))
            elif kind == "reasoning":
                reasoning.append(text_of(part.get("content", "")))
            elif kind == "tool_call":
                calls.append(part)
            elif kind == "tool_call_response":
                results.append(part)
            elif kind in ("blob", "uri", "file"):
                mime = part.get("mime_type") or part.get("modality") or kind
                texts.append(f"[{mime}]")
        for result in results:  # each its own tool message, whichever role carried it
            response = result.get("response", result.get("result"))
            out.append(
                _message(
                    "tool",
                    [text_of(response)],
                    tool_call_id=str(result.get("id") or ""),
                    at_ns=at_ns,
                )
            )
        if texts or reasoning or calls or not results:
            out.append(
                _message(
                    role,
                    texts,
                    reasoning,
                    calls,
                    model=model if role == "assistant" else "",
                    at_ns=at_ns,
                )
            )
    return out


def _system_instructions(data: Any, at_ns: int) -> list[run_pb.ChatMessage]:
    data = json_or_value(data)
    if isinstance(data, str):
        return [_message("system", [data], at_ns=at_ns)]
    if not isinstance(data, list):
        return []
    texts = [
        text_of(part.get("content", "")) if isinstance(part, Mapping) else text_of(part)
        for part in data
    ]
    return [_message("system", texts, at_ns=at_ns)]


_INDEXED = re.compile(r"^(\d+)\.(.+)$")


def _flattened(attrs: Attributes, prefix: str) -> list[dict[str, Any]]:
    """OpenInference's and OpenLLMetry's lists flattened into keys (`PREFIX.0.message.role`), as
    a list of dicts of the keys after the index."""
    items: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, value in attrs.items():
        if key.startswith(prefix):
            found = _INDEXED.match(key[len(prefix) :])
            if found:
                items[int(found.group(1))][found.group(2)] = value
    return [items[i] for i in sorted(items)]


def _openinference_messages(
    attrs: Attributes, which: str, *, model: str, at_ns: int
) -> list[run_pb.ChatMessage]:
    out = []
    for item in _flattened(attrs, f"llm.{which}_messages."):
        role = str(item.get("message.role") or "user")
        texts = [text_of(item["message.content"])] if "message.content" in item else []
        for part in _flattened(item, "message.contents."):
            if part.get("message_content.type", "text") == "text":
                texts.append(text_of(part.get("message_content.text", "")))
        calls = [
            {
                "id": call.get("tool_call.id", ""),
                "name": call.get("tool_call.function.name", ""),
                "arguments": call.get("tool_call.function.arguments"),
            }
            for call in _flattened(item, "message.tool_calls.")
        ]
        out.append(
            _message(
                role,
                texts,
                (),
                calls,
                tool_call_id=str(item.get("message.tool_call_id") or ""),
                function=str(item.get("message.name") or "") if role == "tool" else "",
                model=model if role == "assistant" else "",
                at_ns=at_ns,
            )
        )
    return out


def _openllmetry_messages(
    attrs: Attributes, which: str, *, model: str, at_ns: int
) -> list[run_pb.ChatMessage]:
    out = []
    for item in _flattened(attrs, f"gen_ai.{which}."):
        role = str(item.get("role") or ("assistant" if which == "completion" else "user"))
        calls = [
            {"id": c.get("id", ""), "name": c.get("name", ""), "arguments": c.get("arguments")}
            for c in _flattened(item, "tool_calls.")
        ]
        texts = [text_of(item["content"])] if "content" in item else []
        out.append(
            _message(
                role,
                texts,
                (),
                calls,
                tool_call_id=str(item.get("tool_call_id") or ""),
                model=model if role == "assistant" else "",
                at_ns=at_ns,
            )
        )
    return out


_EVENT_ROLES = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}


def _event_message(
    role: str, body: Mapping[str, Any], *, model: str, at_ns: int
) -> run_pb.ChatMessage:
    calls = []
    for call in body.get("tool_calls") or []:
        if isinstance(call, Mapping):
            function = call.get("function") or {}
            calls.append(
                {
                    "id": call.get("id", ""),
                    "name": function.get("name", "") if isinstance(function, Mapping) else "",
                    "arguments": function.get("arguments")
                    if isinstance(function, Mapping)
                    else None,
                }
            )
    content = body.get("content")
    texts = [text_of(content)] if content not in (None, "") else []
    return _message(
        str(body.get("role") or role),
        texts,
        (),
        calls,
        tool_call_id=str(body.get("id") or "") if role == "tool" else "",
        model=model if role == "assistant" else "",
        at_ns=at_ns,
    )


def _event_messages(
    events: Iterable[trace_pb2.Span.Event], *, model: str
) -> list[run_pb.ChatMessage]:
    out = []
    for event in events:
        body = attributes(event.attributes)
        if event.name in _EVENT_ROLES:
            out.append(
                _event_message(
                    _EVENT_ROLES[event.name], body, model=model, at_ns=event.time_unix_nano
                )
            )
        elif event.name == "gen_ai.choice":
            message = json_or_value(body.get("message"))
            if isinstance(message, Mapping):
                out.append(
                    _event_message("assistant", message, model=model, at_ns=event.time_unix_nano)
                )
    return out


def _first(attrs: Attributes, *keys: str) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value not in (None, ""):
            return value
    return None


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def span_view(span: trace_pb2.Span) -> SpanView:
    """What `span` says of its run."""
    attrs = attributes(span.attributes)
    operation = str(attrs.get("gen_ai.operation.name") or "")
    oi_kind = str(attrs.get("openinference.span.kind") or "").upper()
    model = str(
        _first(attrs, "gen_ai.response.model", "gen_ai.request.model", "llm.model_name") or ""
    )
    view = SpanView(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        name=span.name,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        kind="other",
        agent=str(_first(attrs, "gen_ai.agent.name", "agent.name") or ""),
        model=model,
        provider=str(
            _first(attrs, "gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
            or ""
        ),
        input_tokens=_int(
            _first(
                attrs,
                "gen_ai.usage.input_tokens",
                "gen_ai.usage.prompt_tokens",
                "llm.token_count.prompt",
            )
        ),
        output_tokens=_int(
            _first(
                attrs,
                "gen_ai.usage.output_tokens",
                "gen_ai.usage.completion_tokens",
                "llm.token_count.completion",
            )
        ),
    )
    view.service = str(attrs.get("agentrun.service.name") or "")
    for prefix, into in (
        ("agentrun.run.", view.run_fields),
        ("agentrun.transcript.", view.transcript_fields),
    ):
        for key in ("name", "description", "metadata", "metadata_descriptions", "scores"):
            value = attrs.get(prefix + key)
            if value is None:
                continue
            if key in ("name", "description"):
                into[key] = str(value)
            elif isinstance(value := json_or_value(value), Mapping):
                into[key] = dict(value)
    if span.status.code == STATUS_ERROR:
        view.error = span.status.message or str(attrs.get("error.type") or "error")
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if operation in AGENT_OPERATIONS or (oi_kind in ("AGENT", "CHAIN") and view.agent):
        view.kind = "agent"
    if operation == "execute_tool" or oi_kind == "TOOL":
        view.kind = "tool"
        call_id = str(_first(attrs, "gen_ai.tool.call.id", "tool_call.id", "tool.id") or "")
        result = _first(attrs, "gen_ai.tool.call.result", "output.value")
        if result is not None:
            view.tool_result = _message(
                "tool",
                [text_of(json_or_value(result) if not isinstance(result, str) else result)],
                tool_call_id=call_id,
                function=str(_first(attrs, "gen_ai.tool.name", "tool.name") or ""),
                at_ns=end,
            )
        return view
    messages = (
        _system_instructions(attrs["gen_ai.system_instructions"], start)
        if "gen_ai.system_instructions" in attrs
        else []
    )
    if "gen_ai.input.messages" in attrs or "gen_ai.output.messages" in attrs:
        messages += _genai_messages(attrs.get("gen_ai.input.messages"), model=model, at_ns=start)
        messages += _genai_messages(attrs.get("gen_ai.output.messages"), model=model, at_ns=end)
    elif any(k.startswith(("llm.input_messages.", "llm.output_messages.")) for k in attrs):
        messages += _openinference_messages(attrs, "input", model=model, at_ns=start)
        messages += _openinference_messages(attrs, "output", model=model, at_ns=end)
    elif any(k.startswith(("gen_ai.prompt.", "gen_ai.completion.")) for k in attrs):
        messages += _openllmetry_messages(attrs, "prompt", model=model, at_ns=start)
        messages += _openllmetry_messages(attrs, "completion", model=model, at_ns=end)
    else:
        messages += _event_messages(span.events, model=model)
    if messages:
        view.messages = messages
        if view.kind == "other":
            view.kind = "chat"
    elif operation in CHAT_OPERATIONS or oi_kind == "LLM":
        view.kind = "chat"
    return view
