"""Code written for the seeds, with its imports renamed, runs here unchanged, or fails at once
saying what to change: Docent's `init` and writer, Encord's fail-fast Runner."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

import agentrun as docent  # as a user moving over renames `import docent`
from agentrun import (
    AgentRun,
    BaseAgentRunMetadata,
    Client,
    RpcError,
    Runner,
    Transcript,
    WorkflowError,
)
from agentrun.agent_run_writer import AgentRunWriter
from agentrun.chat import AssistantMessage, UserMessage
from agentrun_server import Server

from .test_orchestrator import set_up


def runs() -> list[AgentRun]:
    return [
        AgentRun(
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
        for _ in range(3)
    ]


async def test_docents_logging_code_runs_unchanged(server: Server) -> None:
    url = f"127.0.0.1:{server.port}"

    def seed_code() -> str:  # the seed's "Logging Agent Runs" page, imports renamed
        writer = docent.init(
            collection_name="elicitation-run",
            api_key=os.getenv("DOCENT_API_KEY"),  # is default and can be omitted
            server_url=url,
            web_url="http://localhost:3001",
        )
        agent_runs: list[AgentRun] = runs()
        writer.log_agent_runs(agent_runs)
        writer.finish(force=False)
        return writer.collection_id

    collection = await asyncio.to_thread(seed_code)

    def stored() -> int:
        with Client(url) as client:
            return client.get_collection(collection).run_count

    assert await asyncio.to_thread(stored) == 3


def test_docents_positional_writer_call_fails_at_once_showing_the_keyword_form() -> None:
    with pytest.raises(TypeError) as refused:
        AgentRunWriter("sk-docent-key", "collection-id", "http://localhost:8889")  # Docent's order
    message = str(refused.value)
    assert "AgentRunWriter(collection_id, server_url=..., api_key=...)" in message
    assert "(api_key, collection_id, server_url)" in message
    assert "sk-docent-key" not in message  # in Docent's order the first argument is the key


async def test_a_validating_runner_fails_at_construction_as_encords_does(server: Server) -> None:
    url = f"127.0.0.1:{server.port}"
    await asyncio.to_thread(set_up, url, [{"name": "work"}], 0)
    with pytest.raises(RpcError) as missing:
        await asyncio.to_thread(Runner, "no-such-workflow", url, validate=True)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    runner = await asyncio.to_thread(Runner, "wf", url, validate=True)

    @runner.stage("work")
    def work(run: AgentRun) -> None:
        return None

    with pytest.raises(
        WorkflowError, match="'review' not in workflow 'wf'; its stages are: 'work'"
    ):

        @runner.stage("review")
        def review(run: AgentRun) -> None:
            return None
