"""Code written for the seeds, with its imports renamed, runs here unchanged, or fails at once
saying what to change: Docent's `init` and writer, Encord's fail-fast Runner."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

import agentrun as docent  # as a user moving over renames `import docent`
from agentrun import (
    AgentRun,
    BaseAgentRunMetadata,
    Client,
    Collection,
    RpcError,
    Runner,
    Transcript,
    WorkflowError,
)
from agentrun.agent_run_writer import AgentRunWriter
from agentrun.chat import AssistantMessage, UserMessage
from agentrun_server import Server

from ..processes import ServerProcess
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


def test_docents_import_paths_work_renamed() -> None:
    """The seed's imports, `docent` renamed: `docent.data_models` and `docent.data_models.chat`."""
    from agentrun.data_models import AgentRun as DocentAgentRun
    from agentrun.data_models import BaseAgentRunMetadata as DocentMetadata
    from agentrun.data_models import Transcript as DocentTranscript
    from agentrun.data_models.chat import AssistantMessage as DocentAssistant
    from agentrun.data_models.chat import UserMessage as DocentUser

    assert (DocentAgentRun, DocentTranscript, DocentMetadata) == (
        AgentRun,
        Transcript,
        BaseAgentRunMetadata,
    )
    assert (DocentUser, DocentAssistant) == (UserMessage, AssistantMessage)


def test_docents_writer_options_request_timeout_and_max_retries() -> None:
    """`max_retries` bounds the attempts per batch, as Docent's does: against a server out of
    reach the runs are undelivered after that many, long before `shutdown_timeout`."""
    writer = AgentRunWriter(
        "collection-id",
        server_url="127.0.0.1:1",  # nothing listens
        request_timeout=5.0,
        max_retries=2,
        shutdown_timeout=60,
    )
    assert writer.request_timeout == 5.0
    writer.log_agent_runs(runs())
    started = time.monotonic()
    summary = writer.finish()
    assert summary.undelivered == 3, summary
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="max_retries"):
        AgentRunWriter("collection-id", server_url="127.0.0.1:1", max_retries=0)


async def test_encords_project_hash_is_taken_as_the_workflow(
    server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agentrun._runner._told_project_hash", False)  # said once per process
    url = f"127.0.0.1:{server.port}"
    await asyncio.to_thread(set_up, url, [{"name": "work"}], 2)
    runner = Runner(project_hash="wf", server_url=url)  # Encord's constructor

    @runner.stage("work")
    def work(run: AgentRun) -> None:
        return None

    assert runner.workflow == "wf"
    assert "project_hash is Encord's" in caplog.text
    summary = await asyncio.to_thread(runner, project_hash="wf")  # Encord's call
    assert sum(summary.completed.values()) == 2
    with pytest.raises(WorkflowError, match="give the workflow only"):
        Runner("wf", project_hash="other")


def test_encords_project_hash_flag_is_taken_as_the_workflow(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(
        "from agentrun import Runner\n"
        "runner = Runner()\n"
        "@runner.stage('work')\n"
        "def work(run):\n"
        "    return None\n"
        "runner.run()\n"
    )
    with ServerProcess(tmp_path / "agentrun.db") as process:
        set_up(process.url, [{"name": "work"}], 2)
        done = subprocess.run(
            [sys.executable, str(script), "--project-hash", "wf", "--server", process.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert "work" in done.stdout + done.stderr and "project_hash is Encord's" in done.stderr


async def test_init_with_an_unknown_collection_id_names_those_that_exist(server: Server) -> None:
    url = f"127.0.0.1:{server.port}"

    def seed_code() -> None:
        docent.init(collection_id="no-such-id", server_url=url)

    created = await asyncio.to_thread(lambda: Client(url).create_collection("airline"))
    with pytest.raises(RpcError) as refused:
        await asyncio.to_thread(seed_code)
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    assert f"collections: 'airline' ({created.id})" in str(refused.value)


async def test_create_collection_returns_the_collection_as_get_collection_does(
    server: Server,
) -> None:
    url = f"127.0.0.1:{server.port}"
    with Client(url) as client:
        created = await asyncio.to_thread(client.create_collection, "evals", "for evals")
        got = await asyncio.to_thread(client.get_collection, created.id)
        again = await asyncio.to_thread(client.create_collection, "evals")
    assert (created.id, created.name, created.description) == (got.id, "evals", "for evals")
    assert created.created and not again.created and again.id == created.id
    assert isinstance(created, Collection) and created.collection == got
