from __future__ import annotations

from agentrun import AgentRun, BaseAgentRunMetadata, Transcript
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


def round_trip(run: AgentRun) -> AgentRun:
    data = agent_run_to_proto(run).SerializeToString()
    return agent_run_from_proto(agent_run_pb2.AgentRun.FromString(data))


def test_edge_values_round_trip() -> None:
    run = AgentRun(
        name="n\x00ame 🦜",
        transcripts={
            "b": Transcript(
                messages=[
                    SystemMessage(content=""),
                    UserMessage(content="q", tool_call_id=["x"]),
                    AssistantMessage(
                        content=[
                            ContentReasoning(reasoning="think", signature="s", redacted=True),
                            ContentText(text="answer", refusal=False),
                        ],
                        model="m",
                        tool_calls=[
                            ToolCall(
                                id="1",
                                function="f",
                                arguments={"a": [1, 2.0, None]},
                                type="function",
                                parse_error="bad",
                                view=ToolCallContent(format="markdown", content="v"),
                            )
                        ],
                    ),
                    ToolMessage(content="r", tool_call_id="1", function="f", error={}),
                ]
            ),
            "a": Transcript(messages=[]),
        },
        metadata=BaseAgentRunMetadata(
            scores={"b": False, "i": 2**40, "f": 0.1, "n": None},
            big=2**80,
            neg=-(2**63),
            nested={"list": [], "dict": {}, "s": "\U0001f600\x00"},
        ),
    )
    back = round_trip(run)
    assert back == run
    assert list(back.transcripts) == ["b", "a"]
    assert type(back.metadata.scores["i"]) is int
    assert back.metadata.get("big") == 2**80
