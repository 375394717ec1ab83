"""Stage functions that see their task: outputs flowing from stage to stage through the task
context, attempts, `Retry` and `Fail`, and the stored outputs read back."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from agentrun import (
    AgentRun,
    Client,
    Fail,
    Retry,
    Runner,
    StageResult,
    Task,
    TaskContext,
    TaskInput,
    TaskState,
    WorkflowSpec,
)
from agentrun_server import Server

from .test_orchestrator import tiny_run


def set_up(url: str) -> None:
    with Client(url) as client:
        client.apply_workflow(
            WorkflowSpec.model_validate(
                {
                    "name": "chain",
                    "stages": [
                        {
                            "name": "a",
                            "pathways": {"next": "b"},
                            "max_attempts": 3,
                            "initial_backoff_seconds": 0.1,
                        },
                        {"name": "b", "pathways": {"next": "c"}},
                        {"name": "c"},
                    ],
                }
            ).to_proto()
        )
        collection = client.create_collection("chain", workflow="chain").collection.id
    from agentrun import AgentRunWriter

    with AgentRunWriter(collection, server_url=url, flush_interval=0.01) as writer:
        writer.log_agent_runs(tiny_run(i, "chain") for i in range(3))


async def test_each_stage_reads_the_last_ones_output_and_may_retry_later_or_fail(
    server: Server,
) -> None:
    url = f"127.0.0.1:{server.port}"
    await asyncio.to_thread(set_up, url)
    runner = Runner(workflow="chain", server_url=url)
    retried_at: dict[str, float] = {}
    created: dict[str, datetime] = {}

    @runner.stage("a")
    def a(task: TaskContext) -> StageResult:  # no run asked for: none is built
        created[task.task_id] = task.create_time
        if task.agent_run_id == "chain-0" and task.attempt == 1:
            raise RuntimeError("flaky")
        return StageResult("next", {"a_attempt": task.attempt, "input_was": task.input})

    @runner.stage("b")
    async def b(run: AgentRun, previous: TaskInput) -> Any:
        if run.id == "chain-1" and run.id not in retried_at:
            retried_at[run.id] = time.monotonic()
            return Retry(after=2)
        waited = time.monotonic() - retried_at.get(run.id, time.monotonic())
        return StageResult("next", {**previous, "b_waited": round(waited, 1)})

    @runner.stage("c")
    def c(task: TaskContext, run: AgentRun) -> Any:
        if run.id == "chain-2":
            return Fail(f"run {run.id} is no good")
        return StageResult(None, {"c_saw": task.input, "stage": task.stage})

    summary = await asyncio.to_thread(runner, progress=False)
    assert dict(summary.failed) == {"a": 1}  # the exception; Retry and Fail(not retryable) aside
    assert dict(summary.retried) == {"b": 1}
    assert dict(summary.dead) == {"c": 1}
    assert summary.completed[("c", "")] == 2

    def stored() -> dict[str, Task]:
        with Client(url) as client:
            return {t.agent_run_id: client.get_task(t.id) for t in client.list_tasks("chain", "c")}

    last = await asyncio.to_thread(stored)

    def first_stage() -> dict[str, Task]:
        with Client(url) as client:
            return {t.id: t for t in client.list_tasks("chain", "a")}

    # Each call knew when its task was created (its wait in the queue starts there).
    for task_id, task in (await asyncio.to_thread(first_stage)).items():
        assert task.create_time is not None
        assert abs((created[task_id] - task.create_time).total_seconds()) < 0.001
    zero_done = last["chain-0"]
    zero = zero_done.output
    assert zero == {
        "c_saw": {"a_attempt": 2, "input_was": None, "b_waited": 0.0},
        "stage": "c",
    }
    one = last["chain-1"].output
    assert 1.8 <= one["c_saw"]["b_waited"] <= 4.0  # Retry(after=2): back after about 2 s
    assert one["c_saw"]["a_attempt"] == 1  # ... and no attempt spent on it
    failed = last["chain-2"]
    assert failed.state == TaskState.DEAD
    assert [f.error for f in failed.failures] == ["run chain-2 is no good"]
    # Each attempt names who held its lease: this process's Runner, by default host/pid-N.
    me = f"{socket.gethostname()}/pid-{os.getpid()}"
    assert [(f.holder.worker, f.holder.key) for f in failed.failures if f.holder] == [(me, "")]
    assert zero_done.holder is not None and zero_done.holder.worker == me

    shown = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "agentrun._cli",
            "tasks",
            "show",
            last["chain-0"].id,
            "--server",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "chain/c, done" in shown.stdout and '"a_attempt": 2' in shown.stdout
    assert "pathway      (end)" in shown.stdout
    assert f"done by      {me}" in shown.stdout


async def test_the_heap_a_runner_starts_with_stays_out_of_full_collections_until_it_returns(
    server: Server,
) -> None:
    """While the Runner works, what was alive at its start is frozen (`gc.freeze`), so a full
    collection walks only what its tasks made; on return the heap is as before."""
    url = f"127.0.0.1:{server.port}"
    await asyncio.to_thread(set_up, url)
    runner = Runner(workflow="chain", server_url=url)
    frozen: list[int] = []

    @runner.stage("a")
    def a(task: TaskContext) -> str:
        frozen.append(gc.get_freeze_count())
        return "next"

    @runner.stage("b")
    async def b(task: TaskContext) -> str:
        frozen.append(gc.get_freeze_count())
        return "next"

    @runner.stage("c")
    def c(task: TaskContext) -> None:
        return None

    assert gc.get_freeze_count() == 0
    summary = await asyncio.to_thread(runner, progress=False)
    assert sum(summary.completed.values()) == 9
    assert len(frozen) == 6 and min(frozen) > 10_000  # the imported libraries, at least
    assert gc.get_freeze_count() == 0
