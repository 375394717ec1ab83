"""The Runner against a server that breaks: every transport failure is a reconnect, and a stage
output the server would refuse fails its task with a clear error instead of leaving it leased.

Faults are injected by a relay on a real socket in front of a real server: it forwards the
Runner's calls, and ends chosen Work streams with the status codes a dying server or a broken
connection produce (grpc/grpc#36066: a server killed mid-write can surface as INTERNAL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from agentrun import Runner, StageResult, TaskContext
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc
from agentrun.v1 import workflow_pb2
from agentrun_server import Server

from .test_hardening import Stubs


@dataclass
class Fault:
    code: grpc.StatusCode
    details: str
    after_leases: bool
    """False: end the stream before it is subscribed; True: after it has handed out leases."""


class FaultyRelay(pb_grpc.OrchestratorServiceServicer):
    """Forwards to `upstream`; Work streams end with the queued faults, one per stream."""

    def __init__(self, upstream: pb_grpc.OrchestratorServiceStub, faults: list[Fault]) -> None:
        self.upstream = upstream
        self.faults = faults
        self.streams = 0

    async def GetWorkflow(self, request: Any, context: Any) -> Any:
        return await self.upstream.GetWorkflow(request)

    async def Work(self, requests: AsyncIterator[pb.WorkRequest], context: Any) -> Any:
        self.streams += 1
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and not fault.after_leases:
            await anext(aiter(requests))  # as the server does: the subscription read, then refused
            await context.abort(fault.code, fault.details)
        call = self.upstream.Work(requests)
        async for response in call:
            yield response
            if fault is not None and response.WhichOneof("kind") == "leases":
                call.cancel()
                await context.abort(fault.code, fault.details)


@pytest.fixture
async def relay(server: Server) -> AsyncIterator[tuple[FaultyRelay, str, Stubs]]:
    stubs = Stubs(server.port)
    relay = FaultyRelay(pb_grpc.OrchestratorServiceStub(stubs.channel), [])
    front = grpc.aio.server()
    pb_grpc.add_OrchestratorServiceServicer_to_server(relay, front)
    port = front.add_insecure_port("127.0.0.1:0")
    await front.start()
    yield relay, f"127.0.0.1:{port}", stubs
    await front.stop(0)
    await stubs.channel.close()


async def test_every_transport_failure_is_a_reconnect_and_held_leases_resume(
    relay: tuple[FaultyRelay, str, Stubs],
) -> None:
    faulty, url, stubs = relay
    await stubs.set_up(runs=6)
    faulty.faults = [
        Fault(grpc.StatusCode.UNKNOWN, "Stream removed", after_leases=False),  # never subscribed
        Fault(grpc.StatusCode.INTERNAL, "Internal error from Core", after_leases=True),
        Fault(grpc.StatusCode.CANCELLED, "Received RST_STREAM", after_leases=False),
        Fault(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_streams_per_peer=1", after_leases=True),
        Fault(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", after_leases=False),
        Fault(grpc.StatusCode.UNAVAILABLE, "Socket closed", after_leases=True),
    ]
    runner = Runner(workflow="wf", server_url=url)
    seen: list[tuple[str, int]] = []

    @runner.stage("work")
    async def work(task: TaskContext) -> StageResult:
        seen.append((task.agent_run_id, task.attempt))
        await asyncio.sleep(0.3)  # still running when the stream breaks under it
        return StageResult(None, {"ok": True})

    summary = await asyncio.wait_for(
        asyncio.to_thread(runner, task_batch_size=1, progress=False), 120
    )
    assert not faulty.faults, "every fault was met"
    assert faulty.streams >= 7
    assert summary.completed[("work", "")] == 6
    tasks = (await stubs.orch.ListTasks(pb.ListTasksRequest(workflow="wf", stage="work"))).tasks
    assert sorted(t.state for t in tasks) == [workflow_pb2.TASK_STATE_DONE] * 6
    # The leases held across each break were resumed, not lost: no attempt was spent.
    assert {attempt for _, attempt in seen} == {1}
    assert sorted(run for run, _ in seen) == sorted(t.agent_run_id for t in tasks)


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED])
async def test_a_refusal_of_the_subscription_itself_ends_the_runner(
    relay: tuple[FaultyRelay, str, Stubs], code: grpc.StatusCode
) -> None:
    faulty, url, stubs = relay
    await stubs.set_up(runs=1)
    faulty.faults = [Fault(code, "refused", after_leases=False)]
    runner = Runner(workflow="wf", server_url=url)
    runner.stage("work")(lambda run: None)
    with pytest.raises(Exception, match=f"{code.name}: refused"):
        await asyncio.wait_for(asyncio.to_thread(runner, progress=False), 30)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            {
                "a": [
                    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
                ]
            },
            "nested",
        ),
        ({"handle": object()}, "cannot encode a object"),
    ],
    ids=["nested-40-deep", "not-json-like"],
)
async def test_an_output_the_server_cannot_take_fails_the_task_with_a_clear_error(
    server: Server, output: Any, expected: str
) -> None:
    stubs = Stubs(server.port)
    await stubs.set_up(
        runs=1,
        stages=[
            workflow_pb2.Stage(name="work", retry_policy=workflow_pb2.RetryPolicy(max_attempts=1))
        ],
    )
    runner = Runner(workflow="wf", server_url=f"127.0.0.1:{server.port}")
    runner.stage("work")(lambda task: StageResult(None, output))
    summary = await asyncio.wait_for(asyncio.to_thread(runner, progress=False), 60)
    assert summary.completed[("work", "")] == 0
    (task,) = (await stubs.orch.ListTasks(pb.ListTasksRequest(workflow="wf", stage="work"))).tasks
    assert task.state == workflow_pb2.TASK_STATE_DEAD
    assert expected in task.failures[-1].error
    await stubs.channel.close()


async def test_a_completion_the_server_refuses_fails_its_task_instead_of_leaving_it_leased(
    server: Server,
) -> None:
    """Past the Runner's own checks (a WorkStream used directly): the refused completion's lease
    is still held on the server, so the stream fails the attempt with the server's reason."""
    from agentrun._convert import value_to_proto
    from agentrun.v1 import agent_run_pb2
    from agentrun.work import WorkStream

    stubs = Stubs(server.port)
    await stubs.set_up(runs=1)
    deep: Any = 1
    for _ in range(30):
        deep = [deep]
    output = agent_run_pb2.Value()
    value_to_proto(deep, output)
    async with WorkStream(f"127.0.0.1:{server.port}", "wf", ["work"], 1) as stream:
        lease = await anext(aiter(stream))
        stream.complete(lease, "", output)

        async def dead() -> workflow_pb2.Task:
            while True:
                got = await stubs.orch.GetTask(pb.GetTaskRequest(task_id=lease.task_id))
                task = got.task
                if task.state == workflow_pb2.TASK_STATE_DEAD:
                    return task
                await asyncio.sleep(0.05)

        task = await asyncio.wait_for(dead(), 10)
    assert "the server refused the worker's completion" in task.failures[-1].error
    assert "completions[0].output: nested more than 20 levels" in task.failures[-1].error
    await stubs.channel.close()
