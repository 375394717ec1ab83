from __future__ import annotations

import pickle

import pytest
from pydantic import Field, PrivateAttr, ValidationError

from agentrun import AgentRun, BaseAgentRunMetadata, Transcript
from agentrun.chat import AssistantMessage, ToolCall, UserMessage

# research/docent.md section 2.4: Docent's verified output for its docs example.
DOCS_EXAMPLE_TEXT = """Here is a complete agent run for analysis purposes only:
<transcript default>
<blocks>
<action unit 0>
<T0B0 | role: user>
Hello, what's 1 + 1?
</T0B0>
<T0B1 | role: assistant>
2
</T0B1>
</action unit 0>
</blocks>
<metadata>
{}

</metadata>
</transcript default>

Metadata about the complete agent run:
<agent run metadata>
scores (A dict of score_key -> score_value. Use one key for each metric you're tracking.):
  correct: true
  reward: 1.0

</agent run metadata>"""


def docs_example() -> AgentRun:
    return AgentRun(
        transcripts={
            "default": Transcript(
                messages=[
                    UserMessage(content="Hello, what's 1 + 1?"),
                    AssistantMessage(content="2"),
                ]
            )
        },
        metadata=BaseAgentRunMetadata(scores={"correct": True, "reward": 1.0}),
    )


def test_docs_example_renders_byte_identical_to_the_seed() -> None:
    assert docs_example().text == DOCS_EXAMPLE_TEXT


def test_a_run_needs_a_transcript() -> None:
    with pytest.raises(ValidationError, match="at least one transcript"):
        AgentRun(transcripts={}, metadata=BaseAgentRunMetadata(scores={}))


def test_scores_are_required() -> None:
    with pytest.raises(ValidationError, match=r"metadata\.scores"):
        AgentRun(transcripts={"t": Transcript(messages=[])}, metadata={})  # type: ignore[arg-type]


def test_score_types_are_kept() -> None:
    scores = BaseAgentRunMetadata(scores={"b": True, "i": 1, "f": 1.0, "n": None}).scores
    assert [type(v) for v in scores.values()] == [bool, int, float, type(None)]


def test_integer_scores_must_fit_the_wire() -> None:
    with pytest.raises(ValidationError, match="integer scores must fit in 64 bits"):
        BaseAgentRunMetadata(scores={"big": 2**63})
    assert BaseAgentRunMetadata(scores={"edge": -(2**63)}).scores["edge"] == -(2**63)


def test_subclass_fields_and_descriptions_render_and_survive_json() -> None:
    class EpisodeMetadata(BaseAgentRunMetadata):
        episode: int = Field(description="Training episode number")

    run = AgentRun(
        transcripts={"t": Transcript(messages=[UserMessage(content="hi")])},
        metadata=EpisodeMetadata(scores={"r": 0.5}, episode=3, tag="x"),
    )
    assert "episode (Training episode number): 3" in run.text
    assert "tag: x" in run.text
    again = AgentRun.model_validate_json(run.model_dump_json())
    assert again.text == run.text
    # Read back as the base class, the descriptions came with the data: kept through a copy and
    # a pickle, part of equality, and not an extra field.
    assert again.metadata.get_field_description("episode") == "Training episode number"
    assert again.metadata.get("_field_descriptions") is None
    copied = again.model_copy(update={"id": "other"})
    assert copied.text.replace("other", again.id) == again.text
    assert pickle.loads(pickle.dumps(again)) == again
    assert again.metadata != BaseAgentRunMetadata(scores={"r": 0.5}, episode=3, tag="x")


def test_a_subclass_keeps_its_own_private_attributes_beside_received_descriptions() -> None:
    class Cached(BaseAgentRunMetadata):
        _cache: int = PrivateAttr(default=7)
        episode: int = Field(description="Training episode number")

    plain = Cached(scores={}, episode=1)
    assert (plain._cache, plain.get_field_description("episode")) == (7, "Training episode number")
    received = Cached.model_validate(
        {"scores": {}, "episode": 1, "_field_descriptions": {"episode": "Sent with the data"}}
    )
    assert (received._cache, received.get_field_description("episode")) == (
        7,
        "Sent with the data",
    )


def test_tool_calls_render_as_function_calls() -> None:
    message = AssistantMessage(
        content="", tool_calls=[ToolCall(id="c1", function="f", arguments={"a": 1, "s": "x"})]
    )
    run = AgentRun(
        transcripts={"t": Transcript(messages=[message])}, metadata=BaseAgentRunMetadata(scores={})
    )
    assert "<tool call>\nf(a=1, s=x)\n</tool call>" in run.text


def test_transcripts_given_as_a_list_are_keyed_by_id() -> None:
    t = Transcript(id="abc", messages=[])
    run = AgentRun(transcripts=[t], metadata=BaseAgentRunMetadata(scores={}))  # type: ignore[arg-type]
    assert list(run.transcripts) == ["abc"]


def test_model_dump_includes_text() -> None:
    assert docs_example().model_dump()["text"] == DOCS_EXAMPLE_TEXT


class EpisodeMetadata(BaseAgentRunMetadata):
    episode: int = Field(description="Training episode number")


def episode_run() -> AgentRun:
    return AgentRun(
        name="nm",
        transcripts={"t": Transcript(messages=[UserMessage(content="hi")])},
        metadata=EpisodeMetadata(
            scores={"correct": True, "reward": 1.0},
            episode=3,
            tag="x",
            extra_field={"nested": {"deep": 1}, "lst": [1, 2]},
        ),
    )


def test_subclass_metadata_renders_as_in_the_seed() -> None:
    # research/docent.md section 2.4: keys sorted, described keys labelled, name injected.
    expected = (
        "<agent run metadata>\n"
        "episode (Training episode number): 3\n"
        "extra_field:\n  lst:\n  - 1\n  - 2\n  nested:\n    deep: 1\n"
        "name: nm\n"
        f"scores ({BaseAgentRunMetadata.SCORES_DESCRIPTION}):\n  correct: true\n  reward: 1.0\n"
        "tag: x\n"
        "\n</agent run metadata>"
    )
    assert episode_run().metadata_block() == expected
    assert episode_run().text.endswith(expected)


def test_filterable_fields_are_the_seeds() -> None:
    fields = [(f["name"], f["type"]) for f in episode_run().get_filterable_fields()]
    assert fields == [
        ("metadata.scores.correct", "bool"),
        ("metadata.scores.reward", "float"),
        ("metadata.episode", "int"),
        ("metadata.tag", "str"),
        ("text", "str"),
    ]
    # metadata.a.b is walked by default, metadata.a.b.c only with a deeper max_depth.
    deeper = [f["name"] for f in episode_run().get_filterable_fields(max_depth=2)]
    assert "metadata.extra_field.nested.deep" in deeper


def test_model_dump_keeps_subclass_fields_and_descriptions() -> None:
    dumped = episode_run().model_dump()["metadata"]
    assert dumped["episode"] == 3
    assert dumped["_field_descriptions"]["episode"] == "Training episode number"
    assert dumped["allow_fields_without_descriptions"] is True
