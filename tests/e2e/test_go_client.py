"""The Go client (clients/go) against live servers in subprocesses: its example uploader with real
runs (partial success), its worker beside a Python Runner in one workflow (drained by SIGTERM),
and a Go worker killed with SIGKILL mid-task whose tasks are leased again and done once.

`make build-go` builds the examples (and runs the Go unit tests) in GOPATH mode over Debian's Go
packages; without Go this module skips, unless AGENTRUN_REQUIRE_TOOLCHAINS=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format

from agentrun import (
    AgentRun,
    AgentRunWriter,
    Client,
    Runner,
    TaskInput,
    TaskState,
    WorkflowSpec,
)
from agentrun._convert import agent_run_to_proto

from ..processes import ServerProcess


def _until(condition: Callable[[], bool], timeout_seconds: float = 60) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _env(server: ServerProcess) -> dict[str, str]:
    return {**os.environ, "AGENTRUN_SERVER": f"grpc://{server.url}"}


def test_the_go_uploader_stores_real_runs_and_answers_each(
    go_bin: Path, tmp_path: Path, real_runs: list[AgentRun]
) -> None:
    runs = real_runs[:20]
    lines = [json_format.MessageToJson(agent_run_to_proto(r), indent=None) for r in runs]
    lines.append(lines[0])  # a duplicate
    lines.append('{"id": "no-transcripts"}')  # invalid: a run has at least one transcript
    with ServerProcess(tmp_path / "agentrun.db") as server:
        uploaded = subprocess.run(
            [str(go_bin / "uploader"), "-collection", "from-go"],
            input="\n".join(lines) + "\n",
            env=_env(server),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert uploaded.returncode == 1, uploaded.stderr  # one run was rejected
        said = uploaded.stdout.splitlines()
        assert said[0] == "accepted=20 duplicates=1 rejected=1", uploaded.stdout
        assert 'index=21 id="no-transcripts" reason=REJECTION_REASON_INVALID' in said[1]
        assert 'field="transcripts"' in said[1]
        with Client(server.url) as client:
            for run in runs:  # stored whole, as the Python SDK would have stored it
                assert agent_run_to_proto(client.get_run(run.id)) == agent_run_to_proto(run)


def test_a_go_worker_and_a_python_runner_share_a_workflow(
    go_bin: Path, tmp_path: Path, real_runs: list[AgentRun]
) -> None:
    runs = real_runs[:30]
    spec = WorkflowSpec.model_validate(
        {
            "name": "mixed",
            "stages": [{"name": "triage", "pathways": {"graded": "grade"}}, {"name": "grade"}],
        }
    )
    with ServerProcess(tmp_path / "agentrun.db") as server, Client(server.url) as client:
        client.apply_workflow(spec)
        collection = client.create_collection("mixed", workflow="mixed").collection
        _upload(server, collection.id, runs)
        go = subprocess.Popen(
            [
                str(go_bin / "worker"),
                "-workflow",
                "mixed",
                "-stage",
                "triage",
                "-pathway",
                "graded",
            ],
            env=_env(server),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _until(lambda: len(client.list_tasks("mixed", "triage", TaskState.DONE)) == len(runs))
        finally:
            go.send_signal(signal.SIGTERM)  # drains: nothing held, so it ends at once
            out, err = go.communicate(timeout=30)
        assert go.returncode == 0, err
        assert out.strip() == f"completed={len(runs)} failed=0 dead=0 revoked=0", out

        runner = Runner(workflow="mixed", server_url=server.url)
        seen: dict[str, object] = {}

        @runner.stage("grade")
        def grade(run: AgentRun, previous: TaskInput) -> None:
            seen[run.id] = previous

        summary = runner()
        assert sum(summary.completed.values()) == len(runs)
        for run in runs:  # the Go stage's output is the Python stage's input
            messages = sum(len(t.messages) for t in run.transcripts.values())
            assert seen[run.id] == {"worker": "go", "messages": messages, "attempt": 1}
        tasks = client.list_tasks("mixed")
        assert len(tasks) == 2 * len(runs)  # one per run per stage: each done once
        assert {t.state for t in tasks} == {TaskState.DONE}
        assert {t.pathway for t in tasks if t.stage == "triage"} == {"graded"}


def test_a_go_worker_killed_mid_task_loses_and_repeats_nothing(
    go_bin: Path, tmp_path: Path, real_runs: list[AgentRun]
) -> None:
    runs = real_runs[:12]
    spec = WorkflowSpec.model_validate({"name": "killed", "stages": [{"name": "work"}]})
    db = tmp_path / "agentrun.db"
    worker = [str(go_bin / "worker"), "-workflow", "killed", "-stage", "work"]
    with (
        ServerProcess(db, None, "--resume-grace-seconds", "1") as server,
        Client(server.url) as client,
    ):
        client.apply_workflow(spec)
        collection = client.create_collection("killed", workflow="killed").collection
        _upload(server, collection.id, runs)
        slow = subprocess.Popen(
            [*worker, "-work", "1h", "-credits", "5"],
            env=_env(server),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _until(lambda: len(client.list_tasks("killed", state=TaskState.LEASED)) == 5)
        killed = {t.id for t in client.list_tasks("killed", state=TaskState.LEASED)}
        slow.send_signal(signal.SIGKILL)
        slow.wait(timeout=10)
        finisher = subprocess.run(
            [*worker, "-exit-when-empty"],
            env=_env(server),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert finisher.returncode == 0, finisher.stderr
        assert finisher.stdout.strip() == f"completed={len(runs)} failed=0 dead=0 revoked=0"
        tasks = client.list_tasks("killed")
        assert len(tasks) == len(runs) and {t.state for t in tasks} == {TaskState.DONE}
        assert {t.agent_run_id for t in tasks} == {r.id for r in runs}
        for task in tasks:  # the killed worker's attempts count, and are on record
            assert task.attempt == (2 if task.id in killed else 1), task
            assert task.output["attempt"] == task.attempt


def _upload(server: ServerProcess, collection_id: str, runs: list[AgentRun]) -> None:
    writer = AgentRunWriter(collection_id, server_url=server.url)
    writer.log_agent_runs(runs)
    assert writer.finish().ok
