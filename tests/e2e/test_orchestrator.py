"""The orchestrator against real workers: killed, slow, failing, draining, many at once.

The server runs as `agentrun serve` in a subprocess; workers are Runners (in this process or in
their own), or raw Work streams where a test needs to hold leases or present stale ones.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    Runner,
    StageResult,
    Task,
    TaskState,
    Transcript,
    WorkflowSpec,
)
from agentrun.chat import UserMessage
from agentrun.v1 import agent_run_pb2
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc

from ..processes import ServerProcess

STALE = 9  # FAILED_PRECONDITION, as an Ack code


def tiny_run(i: int, prefix: str = "wf") -> AgentRun:
    return AgentRun(
        id=f"{prefix}-{i}",
        transcripts={"t": Transcript(messages=[UserMessage(content=f"task {i}")])},
        metadata=BaseAgentRunMetadata(scores={}),
    )


def set_up(url: str, stages: list[dict[str, Any]], runs: int, name: str = "wf") -> str:
    """Apply a workflow, bind a collection to it and upload `runs` runs; return the collection."""
    with Client(url) as client:
        client.apply_workflow(
            WorkflowSpec.model_validate({"name": name, "stages": stages}).to_proto()
        )
        collection = client.create_collection(name, workflow=name).collection.id
    with AgentRunWriter(collection, server_url=url, flush_interval=0.05) as writer:
        writer.log_agent_runs(tiny_run(i, name) for i in range(runs))
    return collection


def tasks(url: str, stage: str = "", workflow: str = "wf") -> list[Task]:
    with Client(url) as client:
        return client.list_tasks(workflow, stage)


class RawWorker:
    """A Work stream driven by hand, for holding leases and presenting stale ones."""

    def __init__(self, url: str) -> None:
        self.channel = grpc.aio.insecure_channel(url)
        self.call = pb_grpc.OrchestratorServiceStub(self.channel).Work()

    async def subscribe(
        self,
        stages: list[str],
        credits: int,
        workflow: str = "wf",
        lease_seconds: float | None = None,
    ) -> None:
        subscribe = pb.Subscribe(
            workflow=workflow,
            stages=[pb.StageSubscription(stage=s) for s in stages],
            credits=credits,
        )
        if lease_seconds is not None:
            subscribe.lease_duration.FromMilliseconds(int(lease_seconds * 1000))
        await self.call.write(pb.WorkRequest(subscribe=subscribe))
        assert (await self.call.read()).WhichOneof("kind") == "subscribed"

    async def next(self, kind: str, timeout_seconds: float = 10) -> Any:
        while True:
            response = await asyncio.wait_for(self.call.read(), timeout_seconds)
            if response.WhichOneof("kind") == kind:
                return getattr(response, kind)

    async def complete(self, task_id: str, lease_id: str, pathway: str = "") -> pb.Ack:
        await self.call.write(
            pb.WorkRequest(
                complete_tasks=pb.CompleteTasks(
                    completions=[
                        pb.TaskCompletion(task_id=task_id, lease_id=lease_id, pathway=pathway)
                    ]
                )
            )
        )
        (ack,) = (await self.next("acks")).acks
        return ack

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@pytest.fixture
def server(database: str) -> Any:
    with ServerProcess(database) as process:
        yield process


LEASE_HOLDER = textwrap.dedent(
    """
    import queue, grpc
    from agentrun.v1 import orchestrator_service_pb2 as pb, orchestrator_service_pb2_grpc as g
    requests = queue.Queue()
    requests.put(pb.WorkRequest(subscribe=pb.Subscribe(
        workflow="wf", stages=[pb.StageSubscription(stage="work")], credits=5)))
    stream = g.OrchestratorServiceStub(grpc.insecure_channel({url!r})).Work(iter(requests.get, None))
    for response in stream:  # hold every lease, never settle
        for lease in response.leases.leases:
            print(lease.task_id, lease.lease_id, flush=True)
    """
)


def test_a_killed_workers_tasks_go_to_another_and_its_late_completions_are_rejected(
    tmp_path: Path,
) -> None:
    # A worker that vanishes may come back and resume its leases: they wait the resume grace
    # (1 s here; 15 s by default), then go to another worker, the attempt counted.
    with ServerProcess(tmp_path / "agentrun.db", None, "--resume-grace-seconds", "1") as server:
        killed_worker_leases_go_elsewhere(server)


def killed_worker_leases_go_elsewhere(server: ServerProcess) -> None:
    set_up(server.url, [{"name": "work", "max_attempts": 3}], runs=20)
    holder = subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER.format(url=server.url)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    held = [holder.stdout.readline().split() for _ in range(5)]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    holder.stdout.close()

    runner = Runner(workflow="wf", server_url=server.url)
    worked: list[str] = []

    @runner.stage("work")
    def work(run: AgentRun) -> None:
        worked.append(run.id)

    summary = runner(task_batch_size=4)
    assert sum(summary.completed.values()) == 20
    assert sorted(worked) == sorted(f"wf-{i}" for i in range(20))  # each once
    by_id = {t.id: t for t in tasks(server.url)}
    assert {t.state for t in by_id.values()} == {TaskState.DONE}
    for task_id, _ in held:  # the killed worker's attempt counts, and is on record
        assert by_id[task_id].attempt == 2
        assert "lease not resumed within 1 s" in by_id[task_id].failures[0].error

    async def late_completion() -> pb.Ack:
        worker = RawWorker(server.url)
        try:
            await worker.subscribe(["work"], 1)
            return await worker.complete(*held[0])
        finally:
            await worker.close()

    ack = asyncio.run(late_completion())
    assert ack.code == STALE and "stale lease" in ack.message


def test_lease_batches_of_large_runs_stay_under_the_message_limit(tmp_path: Path) -> None:
    # 12 runs of ~800 kB leased at once would be a ~10 MB message: over this server's 4 MiB
    # limit, the stream broke and each retry cost the tasks an attempt. Batches now stop at half
    # the limit (2 MiB: two of these runs), and the rest follows in further batches.
    limit = 4 * 1024 * 1024
    with ServerProcess(tmp_path / "agentrun.db", None, "--max-message-bytes", str(limit)) as server:
        with Client(server.url) as client:
            client.apply_workflow(
                WorkflowSpec.model_validate(
                    {"name": "big", "stages": [{"name": "read"}]}
                ).to_proto()
            )
            collection = client.create_collection("big", workflow="big").collection.id
        runs = [tiny_run(i, "big") for i in range(12)]
        for run in runs:
            run.transcripts["t"].messages[0].content = "x" * 800_000
        with AgentRunWriter(
            collection, server_url=server.url, max_batch_bytes=limit // 2
        ) as writer:
            writer.log_agent_runs(runs)

        async def lease_all() -> list[int]:
            worker = RawWorker(server.url)
            try:
                await worker.subscribe(["read"], credits=12, workflow="big")
                batches: list[int] = []
                while sum(batches) < 12:
                    batches.append(len((await worker.next("leases")).leases))
                return batches
            finally:
                await worker.close()

        batches = asyncio.run(lease_all())
    assert sum(batches) == 12 and max(batches) == 2, batches


def test_an_output_over_the_limit_is_refused_per_item_and_task_pages_stay_small(
    tmp_path: Path,
) -> None:
    # A 2 MiB message limit: task pages hold at most 1 MiB of inputs and outputs.
    args = ("--max-message-bytes", str(2 * 1024 * 1024))
    with ServerProcess(tmp_path / "agentrun.db", None, *args) as server:
        set_up(server.url, [{"name": "work"}], runs=4)

        def output(size: int) -> agent_run_pb2.Value:
            return agent_run_pb2.Value(string_value="x" * size)

        async def complete() -> list[list[pb.Ack]]:
            worker = RawWorker(server.url)
            try:
                await worker.subscribe(["work"], credits=4)
                leases: list[pb.Lease] = []
                while len(leases) < 4:
                    leases += (await worker.next("leases")).leases
                answers = []
                # Each message under the 2 MiB limit: the oversize output is ours to refuse.
                rounds = [
                    [(0, 1_100_000), (1, 500_000)],
                    [(0, 500_000), (2, 500_000), (3, 500_000)],
                ]
                for items in rounds:
                    await worker.call.write(
                        pb.WorkRequest(
                            complete_tasks=pb.CompleteTasks(
                                completions=[
                                    pb.TaskCompletion(
                                        task_id=leases[i].task_id,
                                        lease_id=leases[i].lease_id,
                                        output=output(size),
                                    )
                                    for i, size in items
                                ]
                            )
                        )
                    )
                    answers.append(list((await worker.next("acks")).acks))
                return answers
            finally:
                await worker.close()

        first, again = asyncio.run(complete())
        with Client(server.url) as client:
            pages, token = [], ""
            while True:
                page = client._call(
                    client.orchestrator.ListTasks,
                    pb.ListTasksRequest(workflow="wf", page_size=100, page_token=token),
                )
                pages.append(len(page.tasks))
                token = page.next_page_token
                if not token:
                    break
    # The oversize output is refused alone; its lease is kept, and a smaller output completes it.
    assert [a.code for a in first] == [3, 0]
    assert "completions[0].output" in first[0].message and "1,048,576-byte" in first[0].message
    assert [a.code for a in again] == [0, 0, 0]
    assert pages == [2, 2]  # four 500 kB outputs, 1 MiB a page


def test_a_runner_stage_returning_an_oversize_output_fails_its_task_at_once(
    server: ServerProcess,
) -> None:
    set_up(server.url, [{"name": "work"}], runs=2)
    runner = Runner(workflow="wf", server_url=server.url)

    @runner.stage("work")
    def work(run: AgentRun) -> StageResult:
        return StageResult(output={"summary": "x" * (2_000_000 if run.id == "wf-0" else 10)})

    summary = runner()
    assert (sum(summary.completed.values()), sum(summary.dead.values())) == (1, 1)
    by_run = {t.agent_run_id: t for t in tasks(server.url)}
    dead = by_run["wf-0"]
    assert (dead.state, dead.attempt) == (TaskState.DEAD, 1)  # not retried
    assert "over the server's 1,048,576-byte limit" in dead.failures[0].error
    assert by_run["wf-1"].state == TaskState.DONE


def test_a_cancelled_or_expired_lease_is_revoked_on_its_stream_and_frees_its_credit(
    server: ServerProcess,
) -> None:
    set_up(server.url, [{"name": "work"}], runs=2)

    def cancel(task_id: str) -> int:
        with Client(server.url) as client:
            return client.cancel_tasks("wf", task_ids=[task_id])

    async def scenario() -> None:
        worker = RawWorker(server.url)
        try:
            await worker.subscribe(["work"], credits=1, lease_seconds=0.5)
            (first,) = (await worker.next("leases")).leases
            assert await asyncio.to_thread(cancel, first.task_id) == 1
            (revoked,) = (await worker.next("revoked")).leases
            assert (revoked.task_id, revoked.lease_id) == (first.task_id, first.lease_id)
            assert revoked.reason == pb.REVOKE_REASON_CANCELLED
            # Its credit is free: the other task comes, and its lease is let expire.
            (second,) = (await worker.next("leases")).leases
            assert second.task_id != first.task_id
            (expired,) = (await worker.next("revoked")).leases
            assert (expired.lease_id, expired.reason) == (second.lease_id, pb.REVOKE_REASON_EXPIRED)
            # Free again: the same task comes back, at its second attempt.
            (again,) = (await worker.next("leases")).leases
            assert (again.task_id, again.attempt) == (second.task_id, 2)
        finally:
            await worker.close()

    asyncio.run(scenario())


def test_a_runner_stops_a_task_cancelled_while_it_runs(server: ServerProcess) -> None:
    set_up(server.url, [{"name": "work"}], runs=3)
    runner = Runner(workflow="wf", server_url=server.url)
    started = threading.Event()
    stopped: list[str] = []

    @runner.stage("work")
    async def work(run: AgentRun) -> None:
        if run.id == "wf-0":
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                stopped.append(run.id)
                raise

    def cancel_once_started() -> None:
        assert started.wait(30)
        (task,) = [t for t in tasks(server.url) if t.agent_run_id == "wf-0"]
        with Client(server.url) as client:
            assert client.cancel_tasks("wf", task_ids=[task.id]) == 1

    canceller = threading.Thread(target=cancel_once_started)
    canceller.start()
    summary = runner(task_batch_size=3)  # returns once the stages are empty
    canceller.join()
    assert stopped == ["wf-0"]
    assert (summary.revoked["work"], sum(summary.completed.values())) == (1, 2)
    states = {t.agent_run_id: t.state for t in tasks(server.url)}
    assert states == {
        "wf-0": TaskState.CANCELLED,
        "wf-1": TaskState.DONE,
        "wf-2": TaskState.DONE,
    }


def test_an_expired_lease_goes_back_and_extend_keeps_a_long_task(server: ServerProcess) -> None:
    set_up(server.url, [{"name": "work", "lease_seconds": 1.0}], runs=1)

    async def expire() -> tuple[pb.Lease, pb.Lease, pb.Ack]:
        slow, fresh = RawWorker(server.url), RawWorker(server.url)
        try:
            await slow.subscribe(["work"], 1)
            (first,) = (await slow.next("leases")).leases
            # Draining, so the expiry (which frees its credit) does not lease it the task again.
            await slow.call.write(pb.WorkRequest(drain=pb.Drain()))
            await fresh.subscribe(["work"], 1)
            (second,) = (await fresh.next("leases", timeout_seconds=5)).leases  # after expiry
            ack = await slow.complete(first.task_id, first.lease_id)
            await fresh.complete(second.task_id, second.lease_id)
            return first, second, ack
        finally:
            await slow.close()
            await fresh.close()

    first, second, late = asyncio.run(expire())
    assert first.task_id == second.task_id and first.lease_id != second.lease_id
    assert (first.attempt, second.attempt) == (1, 2)
    assert late.code == STALE

    # A Runner extends the lease of a task that runs three times its lease: it never expires.
    set_up(server.url, [{"name": "slow", "lease_seconds": 1.0}], runs=1, name="long")
    runner = Runner(workflow="long", server_url=server.url)

    @runner.stage("slow")
    def slow(run: AgentRun) -> StageResult:
        time.sleep(3)
        return StageResult(output={"seconds": 3})

    summary = runner()
    assert summary.completed[("slow", "")] == 1
    (task,) = tasks(server.url, workflow="long")
    assert (task.state, task.attempt) == (TaskState.DONE, 1)
    assert task.output == {"seconds": 3}


def test_failures_back_off_then_die_and_redrive_brings_them_back(server: ServerProcess) -> None:
    stages = [
        {
            "name": "flaky",
            "pathways": {"ok": "final"},
            "max_attempts": 3,
            "initial_backoff_seconds": 0.3,
            "max_backoff_seconds": 10,
        },
        {"name": "final"},
    ]
    set_up(server.url, stages, runs=2)
    runner = Runner(workflow="wf", server_url=server.url)
    fixed = False

    @runner.stage("flaky")
    def flaky(run: AgentRun) -> str | None:
        if run.id == "wf-1":
            return "no-such-pathway"  # a bug: dead at once, never retried
        if not fixed:
            raise RuntimeError("upstream down")
        return "ok"

    @runner.stage("final")
    def final(run: AgentRun) -> None:
        return None

    summary = runner(num_retries=5)
    assert summary.failed["flaky"] == 3 and summary.dead["flaky"] == 2
    by_run = {t.agent_run_id: t for t in tasks(server.url, "flaky")}
    retried, wrong = by_run["wf-0"], by_run["wf-1"]
    assert (retried.state, retried.attempt) == (TaskState.DEAD, 3)
    times = [f.time.timestamp() for f in retried.failures if f.time is not None]
    assert [f.attempt for f in retried.failures] == [1, 2, 3]
    assert times[1] - times[0] >= 0.3 * 0.8 and times[2] - times[1] >= 0.6 * 0.8  # backoff
    assert "upstream down" in retried.failures[-1].error
    assert (wrong.state, wrong.attempt) == (TaskState.DEAD, 1)
    assert "'ok'" in wrong.failures[0].error  # names the valid pathways

    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentrun._cli",
            "tasks",
            "list",
            "wf",
            "--state",
            "dead",
            "--server",
            server.url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "last error: RuntimeError: upstream down" in listed and listed.count("\n") == 2
    redriven = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentrun._cli",
            "tasks",
            "redrive",
            "wf",
            "--task",
            retried.id,
            "--server",
            server.url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert redriven.strip() == "1 dead tasks redriven"
    fixed = True
    summary = runner()
    assert summary.completed == {("flaky", "ok"): 1, ("final", ""): 1}


def test_credits_are_never_exceeded(server: ServerProcess) -> None:
    stages = [
        {"name": "a", "pathways": {"next": "b"}},
        {"name": "b", "pathways": {"next": "c"}},
        {"name": "c"},
    ]
    set_up(server.url, stages, runs=60)
    nxt = {"a": "next", "b": "next", "c": ""}
    peaks: list[int] = []

    async def worker(credits: int, done: list[int]) -> None:
        """Hold each lease ~10 ms; count leases pushed and not yet acked as settled."""
        raw = RawWorker(server.url)
        writing = asyncio.Lock()
        outstanding = peak = 0
        settling: set[asyncio.Task[None]] = set()

        async def settle(lease: pb.Lease) -> None:
            await asyncio.sleep(0.01)
            async with writing:
                await raw.call.write(
                    pb.WorkRequest(
                        complete_tasks=pb.CompleteTasks(
                            completions=[
                                pb.TaskCompletion(
                                    task_id=lease.task_id,
                                    lease_id=lease.lease_id,
                                    pathway=nxt[lease.stage],
                                )
                            ]
                        )
                    )
                )

        try:
            await raw.subscribe(["a", "b", "c"], credits)
            while done[0] < 180:
                try:
                    response = await asyncio.wait_for(raw.call.read(), 0.5)
                except TimeoutError:
                    continue
                if response.WhichOneof("kind") == "acks":
                    settled = sum(1 for ack in response.acks.acks if ack.code == 0)
                    outstanding -= settled
                    done[0] += settled
                    continue
                for lease in response.leases.leases:
                    outstanding += 1
                    peak = max(peak, outstanding)
                    task = asyncio.create_task(settle(lease))
                    settling.add(task)
                    task.add_done_callback(settling.discard)
            peaks.append((peak, credits))
        finally:
            await raw.close()

    async def many() -> None:
        done = [0]
        await asyncio.wait_for(
            asyncio.gather(*(worker(credits, done) for credits in (1, 2, 3, 1, 2, 3))), 60
        )

    asyncio.run(many())
    by_stage = {s: [t.state for t in tasks(server.url, s)] for s in "abc"}
    assert all(states == [TaskState.DONE] * 60 for states in by_stage.values())
    assert len(peaks) == 6
    assert all(peak <= credits for peak, credits in peaks), peaks
    assert any(peak == credits > 1 for peak, credits in peaks)  # credits were used, not idle


DRAINING_RUNNER = textwrap.dedent(
    """
    import time
    from agentrun import Runner
    runner = Runner(workflow="wf")

    @runner.stage("work")
    def work(run):
        print("started", run.id, flush=True)
        time.sleep(1.5)
        print("finished", run.id, flush=True)

    runner.run()
    """
)


def test_sigterm_drains_hands_back_unstarted_leases_and_exits_0(server: ServerProcess) -> None:
    set_up(server.url, [{"name": "work"}], runs=6)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRAINING_RUNNER,
            "--server",
            server.url,
            "--task-batch-size",
            "4",
            "--concurrency",
            "1",
            "--refresh-every",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().startswith("started")
    time.sleep(0.3)  # the other three leases are pushed and wait for the one slot
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.count("finished") == 1  # the running task finished within the grace
    assert "3 handed back" in err
    states = sorted((t.state, t.attempt) for t in tasks(server.url))
    assert states.count((TaskState.DONE, 1)) == 1
    # Handed back and never leased: ready, and no attempt spent.
    assert states.count((TaskState.READY, 0)) == 5


def test_the_runner_cli_exits_0_once_the_stages_are_empty(
    server: ServerProcess, tmp_path: Path
) -> None:
    set_up(
        server.url,
        [
            {"name": "triage", "pathways": {"solved": "review", "failed": "review"}},
            {"name": "review"},
        ],
        runs=5,
        name="grading",
    )
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[2] / "examples" / "grading_worker.py"),
            "--server",
            server.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "review: 5 done via (end)" in result.stderr
    assert {t.state for t in tasks(server.url, workflow="grading")} == {TaskState.DONE}
    assert len(tasks(server.url, workflow="grading")) == 10


def test_settles_sent_back_to_back_are_each_answered_in_order_as_if_sent_apart(
    server: ServerProcess,
) -> None:
    # A worker that settles each task as it finishes sends many one-item messages at once; the
    # server stores those that arrived together in one transaction, and each message must still
    # get its own answer, in order, as if it had been handled alone.
    set_up(server.url, [{"name": "work", "max_attempts": 2}], runs=40)

    def complete(lease: pb.Lease, pathway: str = "") -> pb.WorkRequest:
        item = pb.TaskCompletion(task_id=lease.task_id, lease_id=lease.lease_id, pathway=pathway)
        return pb.WorkRequest(complete_tasks=pb.CompleteTasks(completions=[item]))

    async def go() -> tuple[list[pb.WorkRequest], list[pb.AckBatch]]:
        raw = RawWorker(server.url)
        try:
            await raw.subscribe(["work"], credits=40)
            leases: list[pb.Lease] = []
            while len(leases) < 40:
                leases.extend((await raw.next("leases")).leases)
            messages = [complete(lease) for lease in leases[:30]]
            messages.insert(6, complete(leases[5]))  # again, right after (a resend)
            fail = pb.TaskFailure(task_id=leases[30].task_id, lease_id=leases[30].lease_id)
            fail.error = "flaky"
            messages.insert(12, pb.WorkRequest(fail_tasks=pb.FailTasks(failures=[fail])))
            messages.insert(20, complete(leases[31], pathway="nope"))  # no such pathway
            for message in messages:  # back to back, no answer awaited
                await raw.call.write(message)
            return messages, [await raw.next("acks") for _ in messages]
        finally:
            await raw.close()

    messages, answers = asyncio.run(go())

    def settled(message: pb.WorkRequest) -> str:
        kind = message.WhichOneof("kind")
        items = message.complete_tasks.completions if kind == "complete_tasks" else None
        return (items or message.fail_tasks.failures)[0].task_id

    assert [[a.task_id for a in batch.acks] for batch in answers] == [
        [settled(m)] for m in messages
    ]
    codes = [batch.acks[0].code for batch in answers]
    # A repeated completion is answered as the first was (the protocol's resend), even when
    # both are stored in the same transaction.
    assert codes[6] == codes[5] == 0
    assert codes[12] == 0
    assert codes[20] == 3 and "nope" in answers[20].acks[0].message  # INVALID_ARGUMENT
    assert [c for i, c in enumerate(codes) if i != 20] == [0] * (len(codes) - 1)
    by_id = {t.id: t for t in tasks(server.url, "work")}
    assert sum(1 for t in by_id.values() if t.state is TaskState.DONE) == 30
    assert [f.error for f in by_id[settled(messages[12])].failures] == ["flaky"]
