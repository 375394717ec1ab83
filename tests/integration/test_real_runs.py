"""Every real run (200 tau-bench, 17 Inspect): imports, round-trips, and splits within limits."""

from __future__ import annotations

import collections

import pytest

from agentrun import AgentRun, AgentRunWithoutMetadataValidator
from agentrun._convert import agent_run_from_proto, agent_run_to_proto
from agentrun.importers import InspectAgentRunMetadata
from agentrun.v1 import agent_run_pb2

from ..support import assert_chunks_hold_the_run


def test_every_real_run_imports(real_runs: list[AgentRun]) -> None:
    kinds = collections.Counter(type(run.metadata).__name__ for run in real_runs)
    assert kinds == {"BaseAgentRunMetadata": 200, InspectAgentRunMetadata.__name__: 17}
    assert len({run.id for run in real_runs}) == 217
    errors = [
        m
        for run in real_runs
        for t in run.transcripts.values()
        for m in t.messages
        if getattr(m, "error", None)
    ]
    assert errors, "the Inspect logs hold tool errors"
    assert any("\x00" in run.text for run in real_runs), "the Inspect logs hold NUL characters"


def test_every_real_run_round_trips_through_the_wire_form(real_runs: list[AgentRun]) -> None:
    for run in real_runs:
        data = agent_run_to_proto(run).SerializeToString()
        back = agent_run_from_proto(
            agent_run_pb2.AgentRun.FromString(data), metadata_type=type(run.metadata)
        )
        assert back == run
        assert back.text == run.text
        # Without the subclass, its fields come back as extras with their descriptions.
        plain = agent_run_from_proto(agent_run_pb2.AgentRun.FromString(data))
        assert plain.text == run.text


def test_every_real_run_round_trips_through_json(real_runs: list[AgentRun]) -> None:
    for run in real_runs:
        back = AgentRunWithoutMetadataValidator.model_validate_json(run.model_dump_json())
        assert back.text == run.text
        assert back.model_dump() == run.model_dump()
        typed = type(run.metadata).model_validate_json(run.metadata.model_dump_json())
        assert typed == run.metadata


@pytest.mark.parametrize("limit", [256, 1024, 8192])
def test_every_real_run_splits_within_the_limit(real_runs: list[AgentRun], limit: int) -> None:
    split = 0
    for run in real_runs:
        split += len(assert_chunks_hold_the_run(run, limit)) > 1
    assert split > 0


def test_every_real_runs_text_is_docents_formula(real_runs: list[AgentRun]) -> None:
    # The seed's AgentRun.text, stated apart from the implementation, which renders each piece
    # once so that to_text can pack the same pieces.
    for run in real_runs:
        transcripts = "\n\n".join(
            f"<transcript {key}>\n{t.to_str(transcript_idx=i)}\n</transcript {key}>"
            for i, (key, t) in enumerate(run.transcripts.items())
        )
        expected = (
            "Here is a complete agent run for analysis purposes only:\n"
            f"{transcripts}\n\n"
            f"Metadata about the complete agent run:\n{run.metadata_block()}"
        )
        assert run.text == expected
        assert run.to_text(10**9) == [expected]  # fits: the text itself, assembled the same way
