"""A trace's spans made into its run: transcripts without repeated history, usage and errors in
metadata. One algorithm for the run as it grows (each batch of new spans, from the state the
earlier ones left) and for the run finished (every span again, in start order).

Each model call carries the whole conversation so far. As in Docent's telemetry: per agent, a
call whose conversation extends a transcript appends its tail to it; one that is a prefix of a
transcript adds nothing; any other starts a new transcript of that agent (a fresh context, a
sub-agent). Messages are compared by role, text and tool-call ids, never by time. A tool span's
result becomes a tool message unless its transcript already shows that call's result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun_server.otlp._spans import SpanView
from agentrun_server.otlp._values import to_value

MAIN = "main"
"""The transcript of spans no agent claims."""
MAX_SPANS_LISTED = 500
"""Spans listed in a run's `spans` metadata (name, duration, status); past it, only counted."""
MAX_ERRORS_LISTED = 20
MAX_CALLS_NAMED = 10_000


def fingerprint(message: run_pb.ChatMessage) -> str:
    """What tells two messages apart when comparing conversations: role, text and tool-call
    ids (a tool result by its call id alone: emitters differ in how they render it)."""
    role = message.WhichOneof("role") or ""
    if role == "tool" and message.tool.tool_call_id:
        return "tool:" + message.tool.tool_call_id
    if message.WhichOneof("content") == "text":
        text = message.text
    else:
        text = "".join(
            p.text.text if p.WhichOneof("kind") == "text" else p.reasoning.reasoning
            for p in message.parts.parts
        )
    calls = (
        ",".join(sorted(c.id for c in message.assistant.tool_calls)) if role == "assistant" else ""
    )
    digest = hashlib.blake2b(f"{role}\0{text}\0{calls}".encode(), digest_size=8).hexdigest()
    return f"{role[:1]}{digest}"


@dataclass
class Assembly:
    """What a trace's spans have made so far: kept between batches (as JSON)."""

    transcripts: dict[str, list[str]] = field(default_factory=dict)
    """Transcript key -> its messages' fingerprints, in order."""
    agents: dict[str, str] = field(default_factory=dict)
    """Span id -> agent name, of the agent spans seen and the model calls and tools under
    them."""
    calls: dict[str, str] = field(default_factory=dict)
    """Tool-call id -> the function called, so a result that does not name it (GenAI's
    `tool_call_response`) is named after its call."""
    name: str = ""
    run_fields: dict[str, Any] = field(default_factory=dict)
    """What `agentrun.run.*` attributes said: name, description, metadata, scores (merged)."""
    trace_id: str = ""
    service: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    models: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    span_count: int = 0

    @classmethod
    def loads(cls, data: bytes | None) -> Assembly:
        return cls(**json.loads(data)) if data else cls()

    def dumps(self) -> bytes:
        # vars, not dataclasses.asdict: that deep-copies every list (a third of the receiver's
        # time, measured by bench_otlp.py's profile).
        return json.dumps(vars(self), separators=(",", ":")).encode()


def _agent_of(view: SpanView, assembly: Assembly) -> str:
    return view.agent or assembly.agents.get(view.parent_id) or MAIN


def _family(assembly: Assembly, agent: str) -> list[str]:
    """An agent's transcript keys: its name, then `name (2)`, `name (3)`..."""
    keys = [agent] if agent in assembly.transcripts else []
    n = 2
    while f"{agent} ({n})" in assembly.transcripts:
        keys.append(f"{agent} ({n})")
        n += 1
    return keys


def _place(
    assembly: Assembly, agent: str, messages: Sequence[run_pb.ChatMessage]
) -> tuple[str, list[run_pb.ChatMessage]]:
    """The transcript a model call's conversation goes to, and the messages it adds there."""
    prints = [fingerprint(m) for m in messages]
    family = _family(assembly, agent)
    for key in family:
        have = assembly.transcripts[key]
        if prints[: len(have)] == have:
            known = len(have)
            have.extend(prints[known:])
            return key, list(messages[known:])
        if have[: len(prints)] == prints:
            return key, []
    key = agent if not family else f"{agent} ({len(family) + 1})"
    assembly.transcripts[key] = prints
    return key, list(messages)


def assemble(
    assembly: Assembly, views: Sequence[SpanView], *, whole: bool = False
) -> run_pb.AgentRun:
    """Add `views` (new spans, in start order) to `assembly`; the patch they make of the run:
    the messages they add, per transcript, and the run's metadata as it stands now (the list of
    spans only when `whole`: the run finished, not each batch as it grows)."""
    patch = run_pb.AgentRun()
    added: dict[str, run_pb.Transcript] = {}

    def append(key: str, messages: Sequence[run_pb.ChatMessage]) -> None:
        if not messages:
            return
        if key not in added:
            added[key] = patch.transcripts.add(key=key, name=key)
        added[key].messages.extend(messages)

    for view in views:
        _name_calls(assembly, view)
        if view.kind == "agent" and view.agent:
            assembly.agents[view.span_id] = view.agent
        agent = _agent_of(view, assembly)
        if view.transcript_fields and view.kind == "agent":
            _transcript_fields(added, patch, agent, view.transcript_fields)
        _run_fields(assembly, view.run_fields)
        if view.kind in ("chat", "tool") and agent != MAIN:
            # Its children (the log records of a call in event mode) belong to its agent too.
            assembly.agents[view.span_id] = agent
        if view.messages:
            key, new = _place(assembly, agent, view.messages)
            append(key, new)
        if view.tool_result is not None:
            family = _family(assembly, agent) or [agent]
            key = family[-1]
            printed = fingerprint(view.tool_result)
            if not any(printed in assembly.transcripts.get(k, []) for k in family):
                assembly.transcripts.setdefault(key, []).append(printed)
                append(key, [view.tool_result])
        _account(assembly, view)
    _metadata(assembly, patch, whole)
    return patch


def _name_calls(assembly: Assembly, view: SpanView) -> None:
    """Remember the view's tool calls, and name its tool results after them."""
    messages = [*view.messages, *([view.tool_result] if view.tool_result else [])]
    for message in messages:
        role = message.WhichOneof("role")
        if role == "assistant":
            for call in message.assistant.tool_calls:
                if call.id and call.function and len(assembly.calls) < MAX_CALLS_NAMED:
                    assembly.calls[call.id] = call.function
        elif role == "tool" and not message.tool.HasField("function"):
            function = assembly.calls.get(message.tool.tool_call_id)
            if function:
                message.tool.function = function


def _transcript_fields(
    added: dict[str, run_pb.Transcript],
    patch: run_pb.AgentRun,
    key: str,
    fields: dict[str, Any],
) -> None:
    if key not in added:
        added[key] = patch.transcripts.add(key=key, name=key)
    transcript = added[key]
    if "name" in fields:
        transcript.name = fields["name"]
    if "description" in fields:
        transcript.description = fields["description"]
    for name, value in fields.get("metadata", {}).items():
        to_value(value, transcript.metadata.fields[str(name)].value)
    _describe(transcript.metadata, fields.get("metadata_descriptions", {}))


def _describe(metadata: run_pb.Metadata, descriptions: dict[str, Any]) -> None:
    """Mark the fields named as declared, with their descriptions (None: declared without)."""
    for name, description in descriptions.items():
        if name in metadata.fields:
            metadata.fields[name].declared = True
            if description is not None:
                metadata.fields[name].description = str(description)


def _run_fields(assembly: Assembly, fields: dict[str, Any]) -> None:
    into = assembly.run_fields
    for key, value in fields.items():
        if key in ("metadata", "metadata_descriptions", "scores"):
            into.setdefault(key, {}).update(value)
        else:
            into[key] = value


def _account(assembly: Assembly, view: SpanView) -> None:
    assembly.span_count += 1
    assembly.trace_id = assembly.trace_id or view.trace_id
    assembly.service = assembly.service or view.service
    assembly.input_tokens += view.input_tokens
    assembly.output_tokens += view.output_tokens
    if view.model and view.model not in assembly.models:
        assembly.models.append(view.model)
    if view.provider and view.provider not in assembly.providers:
        assembly.providers.append(view.provider)
    if view.error and len(assembly.errors) < MAX_ERRORS_LISTED:
        assembly.errors.append(f"{view.name}: {view.error}"[:1000])
    if view.root:
        assembly.name = view.name
    if len(assembly.spans) < MAX_SPANS_LISTED:
        assembly.spans.append(
            {
                "name": view.name,
                "span_id": view.span_id,
                "duration_ms": round(max(0, view.end_ns - view.start_ns) / 1e6, 3),
                "status": "error" if view.error else "ok",
            }
        )


def _metadata(assembly: Assembly, patch: run_pb.AgentRun, whole: bool) -> None:
    fields: dict[str, Any] = {"trace_id": assembly.trace_id, "span_count": assembly.span_count}
    if whole:
        fields["spans"] = assembly.spans
    if assembly.service:
        fields["service_name"] = assembly.service
    if assembly.input_tokens or assembly.output_tokens:
        fields["input_tokens"] = assembly.input_tokens
        fields["output_tokens"] = assembly.output_tokens
    if assembly.models:
        fields["model"] = assembly.models[-1]
        if len(assembly.models) > 1:
            fields["models"] = assembly.models
    if assembly.providers:
        fields["provider"] = assembly.providers[-1]
    if assembly.errors:
        fields["errors"] = assembly.errors
    given = assembly.run_fields
    # What the run says of itself wins over what the receiver makes of its spans.
    fields.update((k, v) for k, v in given.get("metadata", {}).items() if k != "scores")
    for key, value in fields.items():
        to_value(value, patch.metadata.fields[str(key)].value)
    _describe(patch.metadata, given.get("metadata_descriptions", {}))
    for key, value in given.get("scores", {}).items():
        score = patch.scores[str(key)]
        if isinstance(value, bool):
            score.bool_value = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            score.int_value = value
        elif isinstance(value, float):
            score.double_value = value
    name = given.get("name") or assembly.name
    if name:
        patch.name = name[:256]
    if "description" in given:
        patch.description = given["description"]
