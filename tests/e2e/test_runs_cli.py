"""Finding runs without code (issue 28): `agentrun runs list` filtered by state, score and
metadata on the server's index, newest first, paged; `runs show` reading a run; and a server
started on a database whose runs predate the index backfilling their facets. The server runs in
a subprocess, on both engines; the CLI runs as users run it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentrun import AgentRun, AgentRunWriter, BaseAgentRunMetadata, Client, Transcript
from agentrun.chat import AssistantMessage, ToolCall, ToolMessage, UserMessage

from ..postgres import fresh_database
from ..processes import ServerProcess
from ..processes import agentrun_cli as cli


def _run(i: int) -> AgentRun:
    return AgentRun(
        id=f"run-{i:02}",
        name=f"task {i}",
        transcripts={"main": Transcript(messages=[UserMessage(content=f"question {i}")])},
        metadata=BaseAgentRunMetadata(
            scores={"reward": i % 4 / 4}, model="gpt-4o" if i % 2 else "claude", epoch=i // 10
        ),
    )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per engine for the module, its collection `airline` filled once (the tests
    read it; the live run test writes to a collection of its own)."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            database = f"sqlite:///{tmp_path_factory.mktemp('runs') / 'agentrun.db'}"
        else:
            database = stack.enter_context(fresh_database())
        yield from _filled(database)


def _filled(database: str) -> Iterator[ServerProcess]:
    with ServerProcess(database) as process:
        with Client(process.url) as client:
            collection = client.create_collection("airline")
        # One stream: ingestion order is the runs' order (newest first: run-29 first).
        writer = AgentRunWriter(collection.id, server_url=process.url, batch_size=7, num_workers=1)
        writer.log_agent_runs([_run(i) for i in range(30)])
        assert writer.finish().ok
        yield process


def _ids(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0, done.stderr
    return [run["id"] for run in json.loads(done.stdout)["runs"]]


def test_runs_list_filters_on_the_server_newest_first(server: ServerProcess) -> None:
    everything = _ids(cli(server, "runs", "list", "airline", "--json", "--limit", "100"))
    assert everything == [f"run-{i:02}" for i in range(29, -1, -1)]
    low = _ids(cli(server, "runs", "list", "airline", "--json", "--where", "scores.reward < 0.5"))
    assert low == [f"run-{i:02}" for i in range(29, -1, -1) if i % 4 < 2]
    both = cli(
        server,
        "runs",
        "list",
        "airline",
        "--json",
        "--where",
        "scores.reward < 0.5",
        "--where",
        "metadata.model = gpt-4o",
    )
    assert _ids(both) == [f"run-{i:02}" for i in range(29, -1, -1) if i % 4 == 1]
    epoch = _ids(cli(server, "runs", "list", "airline", "--json", "--where", "metadata.epoch >= 2"))
    assert epoch == [f"run-{i:02}" for i in range(29, 19, -1)]
    oldest = _ids(
        cli(server, "runs", "list", "airline", "--json", "--oldest-first", "--limit", "3")
    )
    assert oldest == ["run-00", "run-01", "run-02"]


def test_runs_list_pages_with_the_token_it_prints(server: ServerProcess) -> None:
    seen: list[str] = []
    token = ""
    for _ in range(10):
        args = ["runs", "list", "airline", "--limit", "4", "--where", "metadata.model = claude"]
        done = cli(server, *args, *(["--page-token", token] if token else []))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].split() == ["updated", "state", "messages", "scores", "run"]
        seen += [line.split()[5] for line in lines[1:] if line.split()[2] == "finished"]
        if not lines[-1].startswith("-- more: add --page-token "):
            break
        token = lines[-1].rsplit(" ", 1)[1]
    assert seen == [f"run-{i:02}" for i in range(28, -1, -2)]


def test_a_misspelled_filter_or_collection_is_named(server: ServerProcess) -> None:
    bad = cli(server, "runs", "list", "airline", "--where", "reward < 1")
    assert bad.returncode == 2 and "write FIELD OP VALUE" in bad.stderr
    ordered = cli(server, "runs", "list", "airline", "--where", "metadata.model < gpt")
    assert ordered.returncode == 2 and "by = or != only" in ordered.stderr
    missing = cli(server, "runs", "list", "airlines")
    assert missing.returncode == 1 and "collections: 'airline'" in missing.stderr


def test_runs_list_live_finds_a_running_run_and_show_reads_it(server: ServerProcess) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("live")
    writer = AgentRunWriter(collection.id, server_url=server.url)
    run = writer.live_run(agent_run_id="live-one", name="still going")
    run.append(
        "main",
        [
            UserMessage(content="Where is my bag?"),
            AssistantMessage(
                content="Let me look.",
                tool_calls=[ToolCall(id="c1", function="find_bag", arguments={"tag": "AB12"})],
            ),
            ToolMessage(content="in Denver", tool_call_id="c1", function="find_bag"),
        ],
    )
    writer._events.flush(10)  # type: ignore[union-attr]
    live = _ids(cli(server, "runs", "list", "live", "--live", "--json"))
    assert live == ["live-one"]
    shown = cli(server, "runs", "show", "live-one")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "run live-one: still going"
    assert "[1] user: Where is my bag?" in lines
    assert '      -> find_bag({"tag": "AB12"})' in lines
    assert "[3] tool find_bag: in Denver" in lines
    run.set_scores(reward=1.0)
    run.finish()
    assert writer.finish().ok
    assert _ids(cli(server, "runs", "list", "live", "--live", "--json")) == []
    found = cli(server, "runs", "list", "live", "--json", "--where", "scores.reward = 1")
    assert _ids(found) == ["live-one"]  # its facets written when it finished
    whole = json.loads(cli(server, "runs", "show", "live-one", "--json").stdout)
    assert whole["id"] == "live-one" and whole["metadata"]["scores"] == {"reward": 1.0}


def test_runs_stored_before_the_index_are_found_once_the_server_backfills_them(
    tmp_path: Path,
) -> None:
    """A database migrated from the schema before facets: its runs have none until the server,
    at start, indexes them in the background."""
    db = tmp_path / "agentrun.db"
    with ServerProcess(db) as first:
        with Client(first.url) as client:
            collection = client.create_collection("old")
        writer = AgentRunWriter(collection.id, server_url=first.url)
        writer = AgentRunWriter(collection.id, server_url=first.url, num_workers=1)
        writer.log_agent_runs([_run(i) for i in range(12)])
        assert writer.finish().ok
    import sqlite3

    with sqlite3.connect(db) as conn:  # as the migration finds a database of the version before
        conn.execute("DELETE FROM run_facets")
        conn.execute("UPDATE run_facets_backfill SET done = 0, through = 12")
    with ServerProcess(db) as second:
        deadline = time.monotonic() + 20
        while True:
            found = _ids(
                cli(second, "runs", "list", "old", "--json", "--where", "scores.reward = 0")
            )
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert found == ["run-08", "run-04", "run-00"]
