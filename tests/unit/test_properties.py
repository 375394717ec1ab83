"""Property-based round trips: any run survives the wire form and JSON, with its value types."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

from agentrun import AgentRun, AgentRunWithoutMetadataValidator, BaseAgentRunMetadata, Transcript
from agentrun._convert import agent_run_from_proto, agent_run_to_proto
from agentrun.chat import (
    AssistantMessage,
    ContentReasoning,
    ContentText,
    SystemMessage,
    ToolCall,
    ToolCallContent,
    ToolMessage,
    UserMessage,
)
from agentrun.v1 import agent_run_pb2

# Any character a protobuf string can carry: NUL, controls and non-BMP included (no surrogates).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
keys = text.filter(lambda k: k not in ("_field_descriptions", "allow_fields_without_descriptions"))
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | floats | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
scores = st.dictionaries(text, st.none() | st.booleans() | int64 | floats, max_size=4)


class EpisodeMetadata(BaseAgentRunMetadata):
    episode: int = Field(description="Training episode number")
    tags: list[str] = Field(default_factory=list, description="Free-form tags")


def content(with_reasoning: bool) -> st.SearchStrategy[Any]:
    parts = st.builds(ContentText, text=text, refusal=st.none() | st.booleans())
    if with_reasoning:
        reasoning = st.builds(
            ContentReasoning,
            reasoning=text,
            signature=st.none() | text,
            redacted=st.booleans(),
        )
        parts = parts | reasoning
    return text | st.lists(parts, max_size=3)


tool_calls = st.builds(
    ToolCall,
    id=text,
    function=text,
    arguments=st.dictionaries(text, json_values, max_size=4),
    type=st.none() | st.just("function"),
    parse_error=st.none() | text,
    view=st.none()
    | st.builds(
        ToolCallContent,
        title=st.none() | text,
        format=st.sampled_from(["text", "markdown"]),
        content=text,
    ),
)
# Any instant protobuf can carry, in any zone (naive ones are taken as UTC).
timestamps = st.none() | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.timezones()
)
messages = st.one_of(
    st.builds(SystemMessage, id=st.none() | text, content=content(False), timestamp=timestamps),
    st.builds(
        UserMessage,
        id=st.none() | text,
        timestamp=timestamps,
        content=content(False),
        tool_call_id=st.none() | st.lists(text, min_size=1, max_size=2),
    ),
    st.builds(
        AssistantMessage,
        id=st.none() | text,
        timestamp=timestamps,
        content=content(True),
        model=st.none() | text,
        tool_calls=st.none() | st.lists(tool_calls, min_size=1, max_size=3),
    ),
    st.builds(
        ToolMessage,
        id=st.none() | text,
        timestamp=timestamps,
        content=content(False),
        tool_call_id=st.none() | text,
        function=st.none() | text,
        error=st.none() | st.dictionaries(text, json_values, max_size=3),
    ),
)


@st.composite
def metadata(draw: st.DrawFn) -> BaseAgentRunMetadata:
    extras = draw(
        st.dictionaries(
            keys.filter(lambda k: k not in ("scores", "episode", "tags")), json_values, max_size=4
        )
    )
    if draw(st.booleans()):
        return EpisodeMetadata(
            scores=draw(scores),
            episode=draw(int64),
            tags=draw(st.lists(text, max_size=3)),
            **extras,
        )
    return BaseAgentRunMetadata(scores=draw(scores), **extras)


runs = st.builds(
    AgentRun,
    id=text,
    name=st.none() | text,
    description=st.none() | text,
    transcripts=st.dictionaries(
        text,
        st.builds(
            Transcript,
            id=text,
            name=st.none() | text,
            description=st.none() | text,
            messages=st.lists(messages, max_size=5),
        ),
        min_size=1,
        max_size=3,
    ),
    metadata=metadata(),
)


def typed(value: Any) -> Any:
    """`value` with every leaf tagged by its type: 1, 1.0 and True compare different."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def dump(run: AgentRun) -> Any:
    return typed(AgentRun.model_dump(run, exclude={"text"}))


PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(runs)
def test_the_wire_form_round_trips(run: AgentRun) -> None:
    data = agent_run_to_proto(run).SerializeToString()
    back = agent_run_from_proto(
        agent_run_pb2.AgentRun.FromString(data), metadata_type=type(run.metadata)
    )
    assert dump(back) == dump(run)
    assert back == run
    assert list(back.transcripts) == list(run.transcripts)
    assert back.text == run.text


@PROPERTY_SETTINGS
@given(runs)
def test_the_json_form_round_trips(run: AgentRun) -> None:
    back = AgentRunWithoutMetadataValidator.model_validate_json(run.model_dump_json())
    assert dump(back) == dump(run)
    assert back.text == run.text
    typed_metadata = type(run.metadata).model_validate_json(run.metadata.model_dump_json())
    assert typed_metadata == run.metadata
