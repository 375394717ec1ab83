"""Runs as an agent traced with OpenTelemetry would send them: GenAI spans (for the receiver's
tests and the round trip of the real runs)."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.trace.v1 import trace_pb2

from agentrun import AgentRun
from agentrun._convert import agent_run_to_proto
from agentrun.chat import AssistantMessage, ChatMessage, ContentReasoning, ContentText, ToolMessage


def genai_message(message: ChatMessage) -> dict[str, Any]:
    """A message in the GenAI conventions' `{role, parts}` form."""
    parts: list[dict[str, Any]] = []
    if isinstance(message, ToolMessage):
        parts.append(
            {"type": "tool_call_response", "id": message.tool_call_id, "response": message.text}
        )
        return {"role": "tool", "parts": parts}
    if isinstance(message.content, str):
        parts.append({"type": "text", "content": message.content})
    else:
        for part in message.content:
            if isinstance(part, ContentReasoning):
                parts.append({"type": "reasoning", "content": part.reasoning})
            elif isinstance(part, ContentText):
                parts.append({"type": "text", "content": part.text})
    if isinstance(message, AssistantMessage):
        for call in message.tool_calls or []:
            part: dict[str, Any] = {
                "type": "tool_call",
                "id": call.id,
                "name": call.function,
                "arguments": call.arguments,
            }
            if call.view is not None:  # how Inspect shows the call: agentrun's own key
                part["view"] = call.view.model_dump()
            parts.append(part)
    return {"role": message.role, "parts": parts}


def _descriptions(metadata: Any) -> dict[str, str | None]:
    """The declared fields of a wire-form Metadata, with their descriptions."""
    return {
        name: field.description if field.HasField("description") else None
        for name, field in metadata.fields.items()
        if field.declared
    }


def _span(
    trace_id: bytes, number: int, parent: int, name: str, at: int, attrs: dict[str, Any]
) -> trace_pb2.Span:
    span = trace_pb2.Span(
        trace_id=trace_id,
        span_id=number.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=name,
        start_time_unix_nano=at,
        end_time_unix_nano=at + 1000,
    )
    for key, value in attrs.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        span.attributes.add(key=key).value.string_value = text
    return span


def run_to_spans(
    run: AgentRun, trace_id: bytes, start_ns: int = 1_700_000_000_000_000_000
) -> list[trace_pb2.Span]:
    """`run` as one trace: a root span saying the run's name, metadata and scores; per transcript
    an `invoke_agent` span saying its metadata; per assistant message a model call carrying the
    conversation before it and the message; a last call for messages after the last answer."""
    metadata = run.metadata.model_dump(mode="json", exclude={"scores"}, strip_internal_fields=True)
    root_attrs: dict[str, Any] = {
        "agentrun.run.metadata": metadata,
        "agentrun.run.metadata_descriptions": _descriptions(agent_run_to_proto(run).metadata),
        "agentrun.run.scores": run.metadata.scores,
    }
    if run.name is not None:
        root_attrs["agentrun.run.name"] = run.name
    if run.description is not None:
        root_attrs["agentrun.run.description"] = run.description
    spans = [_span(trace_id, 1, 0, run.name or "run", start_ns, root_attrs)]
    number = 1
    for key, transcript in run.transcripts.items():
        number += 1
        agent = number
        spans.append(
            _span(
                trace_id,
                agent,
                1,
                f"invoke_agent {key}",
                start_ns + number,
                {
                    "gen_ai.operation.name": "invoke_agent",
                    "gen_ai.agent.name": key,
                    "agentrun.transcript.metadata": transcript.metadata.model_dump(
                        mode="json", strip_internal_fields=True
                    ),
                    "agentrun.transcript.metadata_descriptions": _descriptions(
                        agent_run_to_proto(run)
                        .transcripts[list(run.transcripts).index(key)]
                        .metadata
                    ),
                },
            )
        )
        messages = [genai_message(m) for m in transcript.messages]
        answered = 0
        for i, message in enumerate(transcript.messages):
            if isinstance(message, AssistantMessage):
                number += 1
                attrs: dict[str, Any] = {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.input.messages": messages[:i],
                    "gen_ai.output.messages": [messages[i]],
                }
                if message.model:
                    attrs["gen_ai.response.model"] = message.model
                spans.append(_span(trace_id, number, agent, "chat", start_ns + number, attrs))
                answered = i + 1
        if answered < len(messages):
            number += 1
            attrs = {"gen_ai.operation.name": "chat", "gen_ai.input.messages": messages}
            spans.append(_span(trace_id, number, agent, "chat", start_ns + number, attrs))
    return spans


def export_request(
    spans: list[trace_pb2.Span], service: str = "agent"
) -> otlp_pb.ExportTraceServiceRequest:
    request = otlp_pb.ExportTraceServiceRequest()
    resource = request.resource_spans.add()
    resource.resource.attributes.add(key="service.name").value.string_value = service
    resource.scope_spans.add().spans.extend(spans)
    return request
