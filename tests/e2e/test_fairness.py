"""Leases shared fairly between the streams of a workflow (issue 23), on both engines: a stream
that takes leases and never settles them holds its window at most, the streams holding fewest
leases are served first, one API key holds at most its cap over all its streams, and no stream
settles another's lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun_server import Server, ServerConfig
from agentrun_server.orchestrator import WorkLimits

from .test_auth import _auth
from .test_hardening import STALE, Stubs, Worker
from .test_streams import _admin, _run_proto


@pytest.fixture
async def fair(database: str) -> AsyncIterator[tuple[Server, Stubs]]:
    server = Server(
        ServerConfig(
            db=database,
            port=0,
            metrics_port=-1,
            web_port=-1,
            work_limits=WorkLimits(lease_window=50, max_leases_per_key=30),
        )
    )
    await server.start()
    stubs = Stubs(server.port)
    yield server, stubs
    await stubs.channel.close()
    await server.shutdown(grace_seconds=1)


async def _upload(stubs: Stubs, collection: str, ids: range, metadata: Any = ()) -> None:
    request = ingest_pb.UploadAgentRunsRequest(
        collection_id=collection, agent_runs=[_run_proto(f"r{i}") for i in ids]
    )
    response = await stubs.ingest.UploadAgentRuns(iter([request]), metadata=metadata)
    assert response.accepted_count == len(ids)


async def _held(worker: Worker, at_least: int = 0, quiet_seconds: float = 0.5) -> int:
    """Leases pushed to a worker until none comes for `quiet_seconds` once it has `at_least`
    (or for 5 s in all)."""
    got = 0
    deadline = time.monotonic() + 5
    while True:
        try:
            got += len((await worker.next("leases", quiet_seconds)).leases)
        except TimeoutError:
            if got >= at_least or time.monotonic() > deadline:
                return got


async def test_a_stream_that_never_reads_holds_its_window_and_others_get_the_rest(
    fair: tuple[Server, Stubs],
) -> None:
    """The attack of issue 23: a stream asked 10,000 credits and never read; it held the whole
    backlog, and a normal worker got nothing until those leases expired."""
    _, stubs = fair
    collection = await stubs.set_up(runs=0)
    await _upload(stubs, collection, range(400))
    greedy = stubs.orch.Work()
    await greedy.write(
        pb.WorkRequest(
            subscribe=pb.Subscribe(
                workflow="wf", stages=[pb.StageSubscription(stage="work")], credits=10_000
            )
        )
    )
    await asyncio.sleep(1.0)  # it reads nothing: its leases pile up, or would
    backlog = await stubs.orch.GetBacklog(pb.GetBacklogRequest(workflow="wf"))
    assert backlog.stages[0].leased_count <= 50
    worker = Worker(stubs)
    await worker.subscribe(credits=100)
    assert await _held(worker, at_least=50) >= 50
    greedy.cancel()


async def test_the_streams_holding_fewest_leases_are_served_first(
    fair: tuple[Server, Stubs],
) -> None:
    _, stubs = fair
    collection = await stubs.set_up(runs=0)
    busy = Worker(stubs)
    await busy.subscribe(credits=100)
    await _upload(stubs, collection, range(40))
    assert await _held(busy, at_least=40) == 40
    newcomer = Worker(stubs)
    await newcomer.subscribe(credits=100)
    for i in range(40, 60):  # one at a time: each goes to whoever holds fewest
        await _upload(stubs, collection, range(i, i + 1))
    assert await _held(newcomer, at_least=20) == 20
    assert await _held(busy) == 0


async def test_one_key_holds_at_most_its_cap_over_all_its_streams(tmp_path: Any) -> None:
    server = Server(
        ServerConfig(
            db=f"sqlite:///{tmp_path / 'a.db'}",
            port=0,
            metrics_port=-1,
            web_port=-1,
            auth="keys",
            work_limits=WorkLimits(max_leases_per_key=30),
        )
    )
    await server.start()
    stubs = Stubs(server.port)
    try:
        meta = _auth(await _admin(server))
        collection = await stubs.set_up(runs=0, metadata=meta)
        await _upload(stubs, collection, range(100), meta)
        hog = await _admin(server, "hog", scopes=["work"])
        streams = []
        for _ in range(3):
            worker = Worker(stubs, metadata=_auth(hog))
            await worker.subscribe(credits=20)
            streams.append(worker)
        held = [await _held(worker) for worker in streams]
        assert sum(held) == 30
        other = Worker(stubs, metadata=_auth(await _admin(server, "other", scopes=["work"])))
        await other.subscribe(credits=20)
        assert await _held(other, at_least=20) == 20
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_a_stream_cannot_settle_another_streams_lease(fair: tuple[Server, Stubs]) -> None:
    """A lease is settled through the stream holding it: another stream's completion of it is
    refused (it would have freed nothing there and left the holder's credit taken)."""
    _, stubs = fair
    collection = await stubs.set_up(runs=0)
    await _upload(stubs, collection, range(2))
    holder = Worker(stubs)
    await holder.subscribe(credits=1)
    (lease,) = await holder.leases(1)
    other = Worker(stubs)
    await other.subscribe(credits=1)
    await other.leases(1)
    completion = pb.CompleteTasks(
        completions=[pb.TaskCompletion(task_id=lease.task_id, lease_id=lease.lease_id)]
    )
    (refused,) = await other.send(complete_tasks=completion)
    assert refused.code == STALE
    assert "held by another Work stream" in refused.message
    (done,) = await holder.send(complete_tasks=completion)
    assert done.code == 0
    # A lease whose stream broke is detached: the worker resumes it on its new stream, and
    # settles it there.
    await _upload(stubs, collection, range(2, 3))
    (second,) = await holder.leases(1)
    holder.call.cancel()
    await asyncio.sleep(0.3)
    resumed = Worker(stubs)
    subscribed = await resumed.subscribe(
        credits=1, resume=[pb.LeaseRef(task_id=second.task_id, lease_id=second.lease_id)]
    )
    assert [ack.code for ack in subscribed.resumed] == [0]
    (ok,) = await resumed.send(
        complete_tasks=pb.CompleteTasks(
            completions=[pb.TaskCompletion(task_id=second.task_id, lease_id=second.lease_id)]
        )
    )
    assert ok.code == 0
