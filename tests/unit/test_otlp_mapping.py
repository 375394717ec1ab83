"""The OTLP mapping, without a server: spans in each convention an agent may be traced with
(GenAI current, GenAI's older events, OpenLLMetry's flattened prompts, OpenInference) make the
same transcript, once each message, however the spans are batched."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun_server.otlp._assemble import Assembly, assemble
from agentrun_server.otlp._servicer import project, rebuild
from agentrun_server.otlp._spans import span_view

TRACE = bytes(range(16))
QUESTION = "What is the weather in Paris?"
ANSWER = "It is rainy, 14C, in Paris."
SYSTEM = "You are a weather agent."


def _value(data: Any) -> common_pb2.AnyValue:
    value = common_pb2.AnyValue()
    if isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int):
        value.int_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, list):
        value.array_value.values.extend(_value(v) for v in data)
    elif isinstance(data, dict):
        for key, item in data.items():
            value.kvlist_value.values.add(key=key).value.CopyFrom(_value(item))
    return value


def span(
    number: int,
    name: str,
    attrs: dict[str, Any],
    *,
    parent: int = 0,
    start: int = 0,
    events: list[tuple[str, dict[str, Any]]] = (),  # type: ignore[assignment]
) -> trace_pb2.Span:
    made = trace_pb2.Span(
        trace_id=TRACE,
        span_id=number.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=name,
        start_time_unix_nano=(start or number) * 1_000_000_000,
        end_time_unix_nano=((start or number) + 1) * 1_000_000_000 - 1,
    )
    for key, value in attrs.items():
        made.attributes.add(key=key).value.CopyFrom(_value(value))
    for event_name, body in events:
        event = made.events.add(name=event_name, time_unix_nano=made.start_time_unix_nano)
        for key, value in body.items():
            event.attributes.add(key=key).value.CopyFrom(_value(value))
    return made


def _genai(
    number: int, history: list[dict[str, Any]], output: list[dict[str, Any]]
) -> trace_pb2.Span:
    return span(
        number,
        "chat gpt-4o",
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.provider.name": "openai",
            "gen_ai.usage.input_tokens": 10,
            "gen_ai.usage.output_tokens": 5,
            "gen_ai.input.messages": json.dumps(history),
            "gen_ai.output.messages": json.dumps(output),
        },
        parent=1,
    )


USER = {"role": "user", "parts": [{"type": "text", "content": QUESTION}]}
SYSTEM_MESSAGE = {"role": "system", "parts": [{"type": "text", "content": SYSTEM}]}
CALL = {
    "role": "assistant",
    "parts": [
        {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
    ],
}
RESULT = {
    "role": "tool",
    "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy, 14C"}],
}
FINAL = {"role": "assistant", "parts": [{"type": "text", "content": ANSWER}]}


def genai_trace(tool_result_on_span: bool = True) -> list[trace_pb2.Span]:
    tool: dict[str, Any] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "get_weather",
        "gen_ai.tool.call.id": "call_1",
    }
    if tool_result_on_span:
        tool["gen_ai.tool.call.result"] = "rainy, 14C"
    return [
        span(
            1,
            "invoke_agent weather",
            {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "weather"},
            start=1,
        ),
        _genai(2, [SYSTEM_MESSAGE, USER], [CALL]),
        span(3, "execute_tool get_weather", tool, parent=1),
        _genai(4, [SYSTEM_MESSAGE, USER, CALL, RESULT], [FINAL]),
    ]


def openinference_trace() -> list[trace_pb2.Span]:
    def llm(number: int, history: list[tuple[str, str]], tool_call: bool) -> trace_pb2.Span:
        attrs: dict[str, Any] = {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o"}
        for i, (role, content) in enumerate(history):
            attrs[f"llm.input_messages.{i}.message.role"] = role
            if role == "tool":
                attrs[f"llm.input_messages.{i}.message.tool_call_id"] = "call_1"
            if role == "assistant" and not content:
                attrs[f"llm.input_messages.{i}.message.tool_calls.0.tool_call.id"] = "call_1"
                attrs[f"llm.input_messages.{i}.message.tool_calls.0.tool_call.function.name"] = (
                    "get_weather"
                )
                attrs[
                    f"llm.input_messages.{i}.message.tool_calls.0.tool_call.function.arguments"
                ] = '{"city": "Paris"}'
            else:
                attrs[f"llm.input_messages.{i}.message.content"] = content
        attrs["llm.output_messages.0.message.role"] = "assistant"
        if tool_call:
            attrs["llm.output_messages.0.message.tool_calls.0.tool_call.id"] = "call_1"
            attrs["llm.output_messages.0.message.tool_calls.0.tool_call.function.name"] = (
                "get_weather"
            )
            attrs["llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments"] = (
                '{"city": "Paris"}'
            )
        else:
            attrs["llm.output_messages.0.message.content"] = ANSWER
        return span(number, "ChatCompletion", attrs, parent=1)

    history = [("system", SYSTEM), ("user", QUESTION)]
    return [
        span(1, "agent", {"openinference.span.kind": "AGENT", "agent.name": "weather"}, start=1),
        llm(2, history, True),
        llm(4, [*history, ("assistant", ""), ("tool", "rainy, 14C")], False),
    ]


def events_trace() -> list[trace_pb2.Span]:
    """GenAI's older per-message span events (v1.30-era instrumentations)."""
    first = span(
        2,
        "chat gpt-4o",
        {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
        parent=1,
        events=[
            ("gen_ai.system.message", {"content": SYSTEM}),
            ("gen_ai.user.message", {"content": QUESTION}),
            (
                "gen_ai.choice",
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {
                                    "name": "get_weather",
                                    "arguments": '{"city": "Paris"}',
                                },
                            }
                        ],
                    },
                },
            ),
        ],
    )
    second = span(
        4,
        "chat gpt-4o",
        {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
        parent=1,
        events=[
            ("gen_ai.system.message", {"content": SYSTEM}),
            ("gen_ai.user.message", {"content": QUESTION}),
            (
                "gen_ai.assistant.message",
                {
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ]
                },
            ),
            ("gen_ai.tool.message", {"content": "rainy, 14C", "id": "call_1"}),
            ("gen_ai.choice", {"index": 0, "message": {"role": "assistant", "content": ANSWER}}),
        ],
    )
    agent = span(
        1,
        "invoke_agent weather",
        {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "weather"},
        start=1,
    )
    return [agent, first, second]


def _roles(transcript: run_pb.Transcript) -> list[tuple[str, str]]:
    out = []
    for m in transcript.messages:
        role = m.WhichOneof("role") or ""
        text = m.text if m.WhichOneof("content") == "text" else ""
        if role == "assistant" and m.assistant.tool_calls:
            text = "call " + ",".join(f"{c.id}:{c.function}" for c in m.assistant.tool_calls)
        if role == "tool":
            text = f"{m.tool.tool_call_id}={text}"
        out.append((role, text))
    return out


EXPECTED = [
    ("system", SYSTEM),
    ("user", QUESTION),
    ("assistant", "call call_1:get_weather"),
    ("tool", "call_1=rainy, 14C"),
    ("assistant", ANSWER),
]


@pytest.mark.parametrize(
    "spans",
    [genai_trace(), genai_trace(tool_result_on_span=False), openinference_trace(), events_trace()],
    ids=["genai", "genai-result-in-history", "openinference", "genai-events"],
)
def test_every_convention_makes_one_transcript_each_message_once(
    spans: list[trace_pb2.Span],
) -> None:
    folded = rebuild("otel-x", [s.SerializeToString() for s in spans])
    run = run_pb.AgentRun.FromString(folded.data)
    assert [t.key for t in run.transcripts] == ["weather"]
    assert _roles(run.transcripts[0]) == EXPECTED
    call = run.transcripts[0].messages[2].assistant.tool_calls[0]
    assert {f.key: f.value.string_value for f in call.arguments.fields} == {"city": "Paris"}
    assert run.transcripts[0].messages[3].tool.function == "get_weather"  # named after its call
    assert run.name == spans[0].name


def test_batches_as_they_come_make_the_same_messages_as_the_whole_trace() -> None:
    spans = genai_trace()
    # Children end, and so are exported, before the agent span that holds them.
    batches = [[spans[1]], [spans[2], spans[3]], [spans[0]]]
    state = None
    grown = run_pb.AgentRun()
    for batch in batches:
        patch, state = project(state, [s.SerializeToString() for s in batch])
        from agentrun_server.ingestion._live import apply_patch

        apply_patch(grown, run_pb.AgentRun.FromString(patch))
    messages = [m for t in grown.transcripts for m in t.messages]
    assert [(m.WhichOneof("role")) for m in messages] == [r for r, _ in EXPECTED]
    fields = grown.metadata.fields
    assert fields["input_tokens"].value.int_value == 20
    assert fields["output_tokens"].value.int_value == 10
    assert fields["model"].value.string_value == "gpt-4o"
    assert fields["provider"].value.string_value == "openai"
    assert fields["trace_id"].value.string_value == TRACE.hex()
    assert fields["span_count"].value.int_value == 4


def test_two_agents_make_two_transcripts_and_a_new_context_a_third() -> None:
    def agent(number: int, name: str) -> trace_pb2.Span:
        return span(
            number,
            f"invoke_agent {name}",
            {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": name},
            start=number,
        )

    def chat(number: int, parent: int, text: str) -> trace_pb2.Span:
        user = {"role": "user", "parts": [{"type": "text", "content": text}]}
        out = {"role": "assistant", "parts": [{"type": "text", "content": "ok " + text}]}
        made = _genai(number, [user], [out])
        made.parent_span_id = parent.to_bytes(8, "big")
        return made

    spans = [
        agent(1, "planner"),
        chat(2, 1, "plan"),
        agent(3, "coder"),
        chat(4, 3, "code"),
        chat(5, 3, "fresh"),
    ]
    run = run_pb.AgentRun.FromString(rebuild("otel-x", [s.SerializeToString() for s in spans]).data)
    assert [(t.key, len(t.messages)) for t in run.transcripts] == [
        ("planner", 2),
        ("coder", 2),
        ("coder (2)", 2),
    ]


def test_plain_spans_are_kept_as_metadata_beside_an_empty_transcript() -> None:
    spans = [
        span(1, "handle request", {"http.method": "GET"}, start=1),
        span(2, "query db", {"db.system": "postgresql"}, parent=1),
    ]
    spans[1].status.code = 2
    spans[1].status.message = "timeout"
    run = run_pb.AgentRun.FromString(rebuild("otel-x", [s.SerializeToString() for s in spans]).data)
    assert [(t.key, len(t.messages)) for t in run.transcripts] == [("main", 0)]
    listed = run.metadata.fields["spans"].value.list_value.values
    assert [v.struct_value.fields[0].value.string_value for v in listed] == [
        "handle request",
        "query db",
    ]
    assert (
        run.metadata.fields["errors"].value.list_value.values[0].string_value == "query db: timeout"
    )


def test_a_state_survives_its_encoding() -> None:
    assembly = Assembly()
    assemble(assembly, [span_view(s) for s in genai_trace()[:2]])
    again = Assembly.loads(assembly.dumps())
    assert again == assembly


@pytest.mark.parametrize(
    "attrs",
    [
        {"gen_ai.input.messages": 42},
        {"gen_ai.input.messages": "not json ["},
        {"gen_ai.input.messages": json.dumps([{"role": "user", "parts": "text"}])},
        {"gen_ai.input.messages": json.dumps([{"parts": [{"type": "hologram", "x": 1}]}, 7, None])},
        {
            "gen_ai.output.messages": json.dumps(
                [{"role": "assistant", "parts": [{"type": "tool_call"}]}]
            )
        },
        {
            "llm.input_messages.x.message.role": "user",
            "llm.input_messages.0.message.content": [1, 2],
        },
        {"gen_ai.prompt.0.content": {"nested": {"deep": [1, {"a": None}]}}},
    ],
)
def test_an_unknown_attribute_shape_is_kept_not_refused(attrs: dict[str, Any]) -> None:
    made = span(2, "odd", {"gen_ai.operation.name": "chat", **attrs}, parent=1)
    patch = assemble(Assembly(), [span_view(made)], whole=True)
    from agentrun.wire.checks import check_agent_run

    patch.id = "x"
    check_agent_run(patch, patch=True)  # a run's rules hold: it can be stored
    assert (
        patch.metadata.fields["spans"]
        .value.list_value.values[0]
        .struct_value.fields[0]
        .value.string_value
        == "odd"
    )
