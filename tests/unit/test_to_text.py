"""`AgentRun.to_text(token_limit)`: chunks within the limit, nothing dropped, citations kept."""

from __future__ import annotations

import re

import pytest

from agentrun import AgentRun, BaseAgentRunMetadata, Transcript
from agentrun.chat import AssistantMessage, ToolCall, ToolMessage, UserMessage

from ..support import PART, assert_chunks_hold_the_run


def words(n: int, seed: str) -> str:
    return " ".join(f"{seed}{i}" for i in range(n))


def run_with(transcripts: dict[str, list], **metadata: object) -> AgentRun:
    return AgentRun(
        transcripts={key: Transcript(messages=messages) for key, messages in transcripts.items()},
        metadata=BaseAgentRunMetadata(scores={"reward": 1.0}, **metadata),
    )


def test_a_run_that_fits_is_one_chunk_equal_to_text() -> None:
    run = run_with({"t": [UserMessage(content="hi"), AssistantMessage(content="hello")]})
    assert run.to_text() == [run.text]
    assert run.to_text(1024) == [run.text]


def test_every_transcript_keeps_its_own_index_in_split_chunks() -> None:
    run = run_with(
        {
            key: [UserMessage(content=words(150, key)), AssistantMessage(content=words(150, key))]
            for key in ("a", "b", "c")
        }
    )
    chunks = assert_chunks_hold_the_run(run, 512)
    assert len(chunks) >= 3
    for index, key in enumerate("abc"):
        holding = [c for c in chunks if f"<transcript {key}>" in c]
        assert holding
        for chunk in holding:
            section = chunk[
                chunk.index(f"<transcript {key}>") : chunk.index(f"</transcript {key}>")
            ]
            labels = set(re.findall(r"</?T(\d+)B\d+[ >]", section))
            assert labels == {str(index)}
    assert all(
        c.startswith("Here is a partial agent run for analysis purposes only:\n") for c in chunks
    )


def test_an_over_long_message_continues_in_numbered_parts() -> None:
    long_text = words(3000, "w")
    run = run_with({"t": [UserMessage(content="q"), ToolMessage(content=long_text)]})
    chunks = assert_chunks_hold_the_run(run, 256)
    parts = [m for chunk in chunks for m in PART.finditer(chunk)]
    assert len(parts) > 5
    assert {m.group(3) for m in parts} == {str(len(parts))}
    assert [int(m.group(2)) for m in parts] == list(range(1, len(parts) + 1))
    assert "".join(m.group(4) for m in parts) == "\n".join(run.transcripts["t"].unit_blocks()[0])


def test_small_run_metadata_rides_along_in_every_chunk() -> None:
    run = run_with({"t": [UserMessage(content=words(2000, "x"))]}, episode=7)
    chunks = assert_chunks_hold_the_run(run, 400)
    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.endswith(f"\n\nMetadata about the complete agent run:\n{run.metadata_block()}")


def test_large_run_metadata_is_split_not_dropped() -> None:
    run = run_with({"t": [UserMessage(content="hi")]}, notes=words(3000, "m"))
    chunks = assert_chunks_hold_the_run(run, 300)
    yaml_text = run.metadata_block()
    body = yaml_text[yaml_text.index("\n") + 1 : yaml_text.rindex("\n")]
    parts = [m for c in chunks for m in PART.finditer(c) if m.group(1) == "agent run metadata"]
    assert "".join(m.group(4) for m in parts) == body


def test_special_token_strings_are_counted_as_text() -> None:
    run = run_with(
        {"t": [UserMessage(content="<|endoftext|> " * 500), AssistantMessage(content="ok")]}
    )
    assert_chunks_hold_the_run(run, 256)


def test_tool_calls_and_non_bmp_text_survive_splitting() -> None:
    calls = [
        ToolCall(id=str(i), function=f"tool_{i}", arguments={"q": "🦜" * 200}) for i in range(20)
    ]
    run = run_with(
        {"t": [UserMessage(content="go"), AssistantMessage(content="", tool_calls=calls)]}
    )
    assert_chunks_hold_the_run(run, 256)


def test_a_limit_too_small_for_the_headers_is_refused() -> None:
    run = run_with({"t": [UserMessage(content=words(500, "x"))]})
    with pytest.raises(ValueError, match="token_limit must be at least 128"):
        run.to_text(64)
