"""Every mistake gets an honest answer (issue 28): what a user typed wrong is named with what
exists, a command that cannot do what was asked exits non-zero, and nothing secret is echoed.
The server runs in a subprocess on SQLite; the CLI runs as users run it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    LiveRunError,
    Transcript,
    WorkflowSpec,
)
from agentrun.chat import AssistantMessage, UserMessage

from ..processes import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path / "agentrun.db") as process:
        with Client(process.url) as client:
            client.apply_workflow(
                WorkflowSpec.model_validate(
                    {
                        "name": "grading",
                        "stages": [
                            {"name": "triage", "pathways": {"graded": "review"}},
                            {"name": "review"},
                        ],
                    }
                )
            )
        yield process


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentrun._cli", *args, "--server", server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("tasks", "list", "gradnig"),
        ("tasks", "list", "grading", "--stage", "reveiw"),
        ("tasks", "redrive", "gradnig", "--stage", "review"),
        ("tasks", "redrive", "grading", "--stage", "reveiw"),
        ("tasks", "cancel", "gradnig", "--stage", "review"),
        ("tasks", "cancel", "grading", "--stage", "reveiw"),
    ],
)
def test_a_misspelled_workflow_or_stage_is_not_found_naming_those_that_exist(
    server: ServerProcess, command: tuple[str, ...]
) -> None:
    done = cli(server, *command)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    if "gradnig" in command:
        assert "no workflow named 'gradnig'; workflows: 'grading'" in done.stderr, done.stderr
    else:
        assert "has no stage 'reveiw'; stages: 'triage', 'review'" in done.stderr, done.stderr
    with Client(server.url) as client, pytest.raises(Exception, match="workflows: 'grading'"):
        client.backlog("gradnig")


def test_a_runner_that_left_dead_tasks_exits_3(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals", workflow="grading").collection
    run = AgentRun(
        id="doomed",
        transcripts={"t": Transcript(messages=[UserMessage(content="hi")])},
        metadata=BaseAgentRunMetadata(scores={}),
    )
    writer = AgentRunWriter(collection.id, server_url=server.url)
    writer.log_agent_runs([run])
    assert writer.finish().ok
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            from agentrun import Runner
            runner = Runner(workflow="grading")

            @runner.stage("triage")
            def triage(run):
                raise RuntimeError("the grader is down")

            runner.run()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), "--server", server.url, "--num-retries", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert "the grader is down" in done.stderr


def test_a_command_piped_into_head_ends_quietly(server: ServerProcess) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    long = AgentRun(  # printed whole by tail: far more than a pipe's buffer
        id="long",
        transcripts={
            "main": Transcript(
                messages=[UserMessage(content=f"{i} " + "x" * 200) for i in range(3000)]
            )
        },
        metadata=BaseAgentRunMetadata(scores={}),
    )
    writer = AgentRunWriter(collection.id, server_url=server.url)
    writer.log_agent_runs([long])
    assert writer.finish().ok
    piped = subprocess.run(
        f"{sys.executable} -m agentrun._cli tail long --server {server.url} | head -n 2",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [line[:12] for line in piped.stdout.splitlines()] == ["[1] main use", "[2] main use"]
    assert "Traceback" not in piped.stderr and "BrokenPipeError" not in piped.stderr, piped.stderr


def test_tail_of_a_finished_run_prints_it_whole(server: ServerProcess) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    run = AgentRun(
        id="uploaded-whole",
        transcripts={
            "main": Transcript(
                messages=[
                    UserMessage(content="Where is my order?"),
                    AssistantMessage(content="It ships tomorrow."),
                ]
            )
        },
        metadata=BaseAgentRunMetadata(scores={}),
    )
    writer = AgentRunWriter(collection.id, server_url=server.url)
    writer.log_agent_runs([run])
    assert writer.finish().ok
    done = cli(server, "tail", "uploaded-whole")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "main user: Where is my order?" in lines[0], done.stdout
    assert "main assistant: It ships tomorrow." in lines[1], done.stdout
    assert lines[-1] == "-- run uploaded-whole is finished"


def test_live_run_takes_the_metadata_agent_run_takes(server: ServerProcess) -> None:
    """A `BaseAgentRunMetadata` model, and Docent-style metadata carrying `scores`: the scores
    become the run's scores, the rest its metadata fields, as for a run uploaded whole."""
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    writer = AgentRunWriter(collection.id, server_url=server.url)
    model = BaseAgentRunMetadata(scores={"reward": 1.0}, model="gpt-4o", task_id="t-1")
    with writer.live_run(agent_run_id="from-model", metadata=model) as run:
        run.append("main", [UserMessage(content="hi")])
    with writer.live_run(
        agent_run_id="docent-style", metadata={"scores": {"reward": 0}, "model": "gpt-4o"}
    ) as run:
        run.append("main", [UserMessage(content="hi")])
    summary = writer.finish()
    assert summary.ok, summary
    with Client(server.url) as client:
        stored = client.get_run("from-model")
        assert stored.metadata.scores == {"reward": 1.0}
        assert stored.metadata.model_dump()["model"] == "gpt-4o"
        assert stored.metadata.model_dump()["task_id"] == "t-1"
        docent = client.get_run("docent-style")
        assert docent.metadata.scores == {"reward": 0}
        assert docent.metadata.model_dump()["model"] == "gpt-4o"
        assert len(docent.transcripts["main"].messages) == 1


def test_a_refused_opening_event_fails_the_live_run_at_once(server: ServerProcess) -> None:
    """The opening event refused (an unknown collection here): the next append raises with
    the server's reason, rather than every later event being refused one by one."""
    writer = AgentRunWriter("no-such-collection", server_url=server.url)
    run = writer.live_run(agent_run_id="orphan")
    run.append("main", [UserMessage(content="first")])
    with pytest.raises(LiveRunError, match="no collection with id 'no-such-collection'"):
        for _ in range(200):  # until the refusal has come back
            run.append("main", [UserMessage(content="more")])
            time.sleep(0.02)
    summary = writer.finish()
    assert not summary.ok
    assert summary.events_refused[0].sequence == 1


def test_messages_appended_without_a_timestamp_get_the_time_of_append(
    server: ServerProcess,
) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    writer = AgentRunWriter(collection.id, server_url=server.url)
    given = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    before = datetime.now(UTC)
    with writer.live_run(agent_run_id="timed") as run:
        run.append(
            "main", [UserMessage(content="now"), UserMessage(content="then", timestamp=given)]
        )
    after = datetime.now(UTC)
    assert writer.finish().ok
    with Client(server.url) as client:
        now, then = client.get_run("timed").transcripts["main"].messages
    assert now.timestamp is not None and before <= now.timestamp <= after
    assert then.timestamp == given
