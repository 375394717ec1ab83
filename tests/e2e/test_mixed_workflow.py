"""One workflow, three languages: a Go worker, a C++ worker and a Python Runner each own a stage
on one server, run at once; every task is done once, and each stage's output is the next
stage's input across languages. The Go and C++ workers drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from agentrun import (
    AgentRun,
    AgentRunWriter,
    Client,
    Runner,
    TaskInput,
    TaskState,
    WorkflowSpec,
)

from ..processes import ServerProcess


def test_go_cpp_and_python_workers_share_a_workflow(
    go_bin: Path, cpp_bin: Path, tmp_path: Path, real_runs: list[AgentRun]
) -> None:
    runs = real_runs[:40]
    spec = WorkflowSpec.model_validate(
        {
            "name": "mixed",
            "stages": [
                {"name": "triage", "pathways": {"graded": "grade"}},
                {"name": "grade", "pathways": {"scored": "review"}},
                {"name": "review"},
            ],
        }
    )
    with ServerProcess(tmp_path / "agentrun.db") as server, Client(server.url) as client:
        client.apply_workflow(spec)
        collection = client.create_collection("mixed", workflow="mixed").collection
        env = {**os.environ, "AGENTRUN_SERVER": f"grpc://{server.url}"}
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
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        cpp = subprocess.Popen(
            [str(cpp_bin / "agentrun-worker"), "mixed", "grade", "scored", "--credits", "4"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            writer = AgentRunWriter(collection.id, server_url=server.url)
            writer.log_agent_runs(runs)  # uploaded while both workers wait for tasks
            assert writer.finish().ok
            deadline = time.monotonic() + 60
            while len(client.list_tasks("mixed", "grade", TaskState.DONE)) < len(runs):
                assert time.monotonic() < deadline, "the Go and C++ stages did not finish"
                time.sleep(0.1)
        finally:
            for worker in (go, cpp):
                worker.send_signal(signal.SIGTERM)  # drains: nothing held, so it ends at once
            outputs = {name: p.communicate(timeout=30) for name, p in (("go", go), ("cpp", cpp))}
        for name, process in (("go", go), ("cpp", cpp)):
            out, err = outputs[name]
            assert process.returncode == 0, err
            assert out.strip() == f"completed={len(runs)} failed=0 dead=0 revoked=0", out

        runner = Runner(workflow="mixed", server_url=server.url)
        seen: dict[str, object] = {}

        @runner.stage("review")
        def review(run: AgentRun, previous: TaskInput) -> None:
            seen[run.id] = previous

        assert sum(runner().completed.values()) == len(runs)
        grades = {t.agent_run_id: t for t in client.list_tasks("mixed", "grade")}
        for run in runs:
            messages = sum(len(t.messages) for t in run.transcripts.values())
            # Go's output was C++'s input; C++'s output was Python's.
            assert grades[run.id].input == {"worker": "go", "messages": messages, "attempt": 1}
            assert seen[run.id] == {"worker": "cpp", "messages": messages, "attempt": 1}
        tasks = client.list_tasks("mixed")
        assert len(tasks) == 3 * len(runs)  # one per run per stage: each done once
        assert {t.state for t in tasks} == {TaskState.DONE}


def test_a_cancelled_task_wakes_the_go_and_cpp_stage_functions_at_once(
    go_bin: Path, cpp_bin: Path, tmp_path: Path, real_runs: list[AgentRun]
) -> None:
    """A stage function waiting a minute (the example's `-work` / `--work-ms`, a model call)
    learns of its lease's revocation at once: Go through its ctx, C++ through its Revocation's
    WaitFor. Neither settles the task; both then find their stage empty and exit."""
    runs = real_runs[:3]
    commands = {
        "go": [str(go_bin / "worker"), "-workflow", "slow", "-stage", "grade", "-work", "60s"],
        "cpp": [str(cpp_bin / "agentrun-worker"), "slow", "grade", "--work-ms", "60000"],
    }
    spec = WorkflowSpec.model_validate({"name": "slow", "stages": [{"name": "grade"}]})
    for language, command in commands.items():
        with ServerProcess(tmp_path / f"{language}.db") as server, Client(server.url) as client:
            client.apply_workflow(spec)
            collection = client.create_collection("slow", workflow="slow").collection
            writer = AgentRunWriter(collection.id, server_url=server.url)
            writer.log_agent_runs(runs)
            assert writer.finish().ok
            flag = "-exit-when-empty" if language == "go" else "--exit-when-empty"
            worker = subprocess.Popen(
                [*command, flag],
                env={**os.environ, "AGENTRUN_SERVER": f"grpc://{server.url}"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                deadline = time.monotonic() + 30
                while len(client.list_tasks("slow", "grade", TaskState.LEASED)) < len(runs):
                    assert time.monotonic() < deadline, f"{language}: the tasks were not leased"
                    time.sleep(0.05)
                assert client.cancel_tasks("slow", "grade") == len(runs)
                cancelled = time.monotonic()
                out, err = worker.communicate(timeout=20)  # the functions would wait 60 s
            finally:
                worker.kill()
            assert time.monotonic() - cancelled < 10, f"{language}: {err}"
            assert worker.returncode == 0, err
            assert out.strip() == f"completed=0 failed=0 dead=0 revoked={len(runs)}", out
            tasks = client.list_tasks("slow")
            assert {t.state for t in tasks} == {TaskState.CANCELLED}
