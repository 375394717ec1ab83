"""Two server replicas on one PostgreSQL database, Runners balanced over both (round robin): one
replica restarted gracefully under load, the other killed and restarted. Two replicas sweeping for
abandoned live runs at once (on either engine) enter each run once."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentrun import AgentRunWriter, Client, TaskState, WorkflowSpec
from agentrun.chat import UserMessage

from ..postgres import fresh_database
from ..processes import ServerProcess, free_port
from .test_orchestrator import tiny_run
from .test_restarts import (
    RUNNERS,
    THREE_STAGES,
    all_tasks,
    done_count,
    finish,
    start_runners,
    wait_until,
)

RUNS = 2000


def test_two_replicas_survive_a_graceful_restart_and_a_kill_losing_nothing(tmp_path: Path) -> None:
    with fresh_database() as db:
        a = ServerProcess(db, free_port()).start()
        b = ServerProcess(db, free_port()).start()
        both = f"{a.url},{b.url}"
        runners: list[subprocess.Popen[str]] = []
        try:
            with Client(a.url) as client:
                client.apply_workflow(
                    WorkflowSpec.model_validate(
                        {"name": "three", "stages": THREE_STAGES}
                    ).to_proto()
                )
                collection = client.create_collection("three", workflow="three").collection.id
            for server, first in ((a, 0), (b, RUNS // 2)):  # half the runs through each replica
                with AgentRunWriter(
                    collection, server_url=server.url, flush_interval=0.05
                ) as writer:
                    writer.log_agent_runs(
                        tiny_run(i, "three") for i in range(first, first + RUNS // 2)
                    )
            runners = start_runners(both)
            wait_until(lambda: done_count(a.url) >= 1500, 60, "a quarter of the tasks")
            assert b.terminate() == 0  # graceful: its workers reconnect to A, then to either
            b.start()
            wait_until(lambda: done_count(a.url) >= 3500, 60, "more than half of the tasks")
            a.kill()  # its streams' leases are resumed on B, or recovered after the grace
            killed = time.time()
            a.start()
            summaries = finish(runners, 120)
            tasks = all_tasks(b.url)
        finally:
            for runner in runners:
                runner.kill()
            a.__exit__()
            b.__exit__()
    assert len(tasks) == 3 * RUNS
    assert {t.state for t in tasks} == {TaskState.DONE}
    for task in tasks:
        # Every attempt past the first is explained by a recorded end of the one before: a task
        # leased twice at once would show an attempt with no failure before it.
        assert task.attempt == 1 + len(task.failures), task
        for failure in task.failures:  # only the kill cost attempts, never the graceful restart
            assert "not resumed" in failure.error, failure
            assert failure.time is not None and failure.time.timestamp() >= killed, failure
    assert sum(t.attempt - 1 for t in tasks) <= RUNNERS * 16  # at most what was held at the kill
    assert sum(s["done"] for s in summaries) >= 3 * RUNS


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_replicas_sweeping_at_once_enter_each_abandoned_run_once(
    engine: str, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if engine == "postgres":
            db = stack.enter_context(fresh_database())
        else:
            db = f"sqlite:///{tmp_path / 'agentrun.db'}"
        # Both sweep every 0.1 s; the runs fall silent together and are entered under contention.
        metrics_ports = [free_port(), free_port()]
        replicas = [
            ServerProcess(
                db, free_port(), "--live-run-timeout", "0.4", "--metrics-port", str(port)
            ).start()
            for port in metrics_ports
        ]
        for replica in replicas:
            stack.callback(replica.terminate)
        with Client(replicas[0].url) as client:
            client.apply_workflow(
                WorkflowSpec.model_validate({"name": "w", "stages": [{"name": "s"}]}).to_proto()
            )
            collection = client.create_collection(
                "abandoning", workflow="w", enter_workflow_on_abandon=True
            ).collection.id
        runs = 300
        for replica, half in zip(replicas, (range(0, runs, 2), range(1, runs, 2)), strict=True):
            writer = AgentRunWriter(collection, server_url=replica.url)
            for i in half:
                writer.live_run(f"silent-{i}").append("main", [UserMessage(content=f"step {i}")])
            assert writer.finish().ok  # the runs stay open, and fall silent
        with Client(replicas[1].url) as client:
            wait_until(lambda: len(client.list_tasks("w")) >= runs, 30, "every run entered")
            time.sleep(1)  # more sweeps by both: none may enter a run again
            tasks = client.list_tasks("w")
        assert sorted(t.agent_run_id for t in tasks) == sorted(f"silent-{i}" for i in range(runs))
        # A second entry would hide behind the one active task a run may have; the replicas'
        # own counts show none happened.
        entered = [entered_on_abandon(f"http://127.0.0.1:{port}/metrics") for port in metrics_ports]
        assert sum(entered) == runs, entered


def entered_on_abandon(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
    for family in text_string_to_metric_families(page):
        if family.name == "agentrun_ingest_live_runs_entered_on_abandon":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    raise AssertionError("no agentrun_ingest_live_runs_entered_on_abandon on " + url)
