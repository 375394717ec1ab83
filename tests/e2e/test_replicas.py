"""Two server replicas on one PostgreSQL database, Runners balanced over both (round robin): one
replica restarted gracefully under load, the other killed and restarted."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from agentrun import AgentRunWriter, Client, WorkflowSpec
from agentrun.v1 import workflow_pb2

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
    assert {t.state for t in tasks} == {workflow_pb2.TASK_STATE_DONE}
    for task in tasks:
        # Every attempt past the first is explained by a recorded end of the one before: a task
        # leased twice at once would show an attempt with no failure before it.
        assert task.attempt == 1 + len(task.failures), task
        for failure in task.failures:  # only the kill cost attempts, never the graceful restart
            assert "not resumed" in failure.error, failure
            assert failure.time.ToNanoseconds() / 1e9 >= killed, failure
    assert sum(t.attempt - 1 for t in tasks) <= RUNNERS * 16  # at most what was held at the kill
    assert sum(s["done"] for s in summaries) >= 3 * RUNS
