"""The storage contract: leases beyond a settle. Streams that end, workers that resume, servers
that go silent, expiry, cancel and redrive, and the revocations other processes read."""

from __future__ import annotations

import pytest

from agentrun_server._errors import InvalidArgument
from agentrun_server.storage import (
    AckCode,
    ClaimRequest,
    Completion,
    Failure,
    LeaseHolder,
    LeaseRef,
    Storage,
    TaskState,
)

from .conftest import OpenStorage, ingest

GRACE = 15.0


def session(name: str, server: str = "", limit: int = 10) -> ClaimRequest:
    return ClaimRequest(
        name, "w", {"a": limit}, limit, None, server_id=server, worker=f"{name}@host", key="k"
    )


async def test_a_lease_past_its_deadline_ends_and_its_stream_hears_of_it(storage: Storage) -> None:
    await ingest(storage, 2)  # stage a: 30 s leases, 2 attempts
    start, _ = await storage.revocations_after(-1)
    first = await storage.claim(session("s1"), 10.0)
    expired, recovered = await storage.sweep(39.0, GRACE)
    assert (expired, recovered) == ([], [])
    expired, _ = await storage.sweep(41.0, GRACE)
    assert sorted(e.task_id for e in expired) == sorted(t.task_id for t in first)
    assert {(e.session_id, e.dead) for e in expired} == {("s1", False)}
    last, revoked = await storage.revocations_after(start)
    assert {(r.task_id, r.lease_id, r.session_id, r.reason) for r in revoked} == {
        (t.task_id, t.lease_id, "s1", "expired") for t in first
    }
    assert await storage.revocations_after(last) == (last, [])
    (late,) = await storage.complete(
        [Completion(first[0].task_id, first[0].lease_id, "next")], 42.0
    )
    assert late.code is AckCode.FAILED_PRECONDITION
    second = await storage.claim(session("s2"), 50.0)
    assert {t.attempt for t in second} == {2}
    expired, _ = await storage.sweep(100.0, GRACE)
    assert {e.dead for e in expired} == {True}  # the last attempt: dead letters
    task = await storage.get_task(first[0].task_id)
    assert task.state is TaskState.DEAD
    assert [f.error for f in task.failures] == ["lease expired", "lease expired"]


async def test_a_closed_stream_hands_its_leases_back_at_once_with_the_attempt_counted(
    storage: Storage,
) -> None:
    await ingest(storage, 2)
    await storage.claim(session("s1"), 10.0)
    ended = await storage.end_session_leases("s1", 11.0)
    assert len(ended) == 2 and not any(e.dead for e in ended)
    again = await storage.claim(session("s2"), 12.0)
    assert {t.attempt for t in again} == {2}
    assert await storage.end_session_leases("nobody", 13.0) == []
    failures = (await storage.get_task(again[0].task_id)).failures
    assert "closed its stream" in failures[0].error


async def test_a_detached_lease_waits_the_grace_for_its_worker_to_resume_it(
    storage: Storage,
) -> None:
    await ingest(storage, 3)
    held = await storage.claim(session("s1", "server-1"), 10.0)
    assert await storage.detach_session("s1", 11.0) == 3
    # Still leased: nobody else gets them, the lease ids still settle.
    assert await storage.claim(session("s2"), 12.0) == []
    (done,) = await storage.complete([Completion(held[0].task_id, held[0].lease_id, "stop")], 12.0)
    assert done.code is AckCode.OK
    # The worker reconnects and resumes one (and presents the settled one, and nonsense).
    acks = await storage.resume(
        LeaseHolder("s3@host", "k", "s3"),
        "server-2",
        [
            LeaseRef(held[1].task_id, held[1].lease_id),
            LeaseRef(held[0].task_id, held[0].lease_id),
            LeaseRef(99_999, "nope"),
        ],
        13.0,
    )
    assert [a.code for a in acks] == [
        AckCode.OK,
        AckCode.FAILED_PRECONDITION,
        AckCode.NOT_FOUND,
    ]
    assert acks[0].deadline == held[1].deadline and acks[0].result == "resumed"
    _, recovered = await storage.sweep(11.0 + GRACE - 1, GRACE)
    assert recovered == []
    _, recovered = await storage.sweep(11.0 + GRACE, GRACE)
    assert [r.task_id for r in recovered] == [held[2].task_id]  # not the resumed one
    (again,) = await storage.claim(session("s4"), 30.0)
    assert again.task_id == held[2].task_id and again.attempt == 2
    assert "not resumed within 15 s" in (await storage.get_task(again.task_id)).failures[0].error


async def test_a_tasks_history_names_who_held_each_lease(storage: Storage) -> None:
    await ingest(storage, 2)  # stage a: 30 s leases, 2 attempts
    one, two = await storage.claim(session("s1"), 10.0)
    assert (await storage.get_task(one.task_id)).holder == LeaseHolder("s1@host", "k", "s1")
    (failed,) = await storage.fail([Failure(one.task_id, one.lease_id, "flaky", False)], 11.0)
    assert failed.result == "retry"
    (done,) = await storage.complete([Completion(two.task_id, two.lease_id, "stop")], 11.0)
    assert done.code is AckCode.OK
    # A worker that resumes a lease on a new stream holds it from then on.
    (again,) = await storage.claim(session("s2"), 24.0)  # after the 10 s (+-20 %) backoff
    await storage.detach_session("s2", 25.0)
    (resumed,) = await storage.resume(
        LeaseHolder("", "k2", "s3"), "", [LeaseRef(again.task_id, again.lease_id)], 26.0
    )
    assert resumed.code is AckCode.OK
    leased = await storage.get_task(one.task_id)
    assert leased.holder == LeaseHolder("", "k2", "s3")
    expired, _ = await storage.sweep(24.0 + 31, GRACE)  # the last attempt expires: dead
    assert [e.dead for e in expired] == [True]
    dead = await storage.get_task(one.task_id)
    assert [(f.error, f.holder) for f in dead.failures] == [
        ("flaky", LeaseHolder("s1@host", "k", "s1")),
        ("lease expired", LeaseHolder("", "k2", "s3")),
    ]
    # A done task keeps the holder of the attempt that completed it.
    assert (await storage.get_task(two.task_id)).holder == LeaseHolder("s1@host", "k", "s1")


async def test_the_leases_of_a_server_gone_silent_are_recovered_after_the_grace(
    storage: Storage,
) -> None:
    await ingest(storage, 2)
    await storage.heartbeat("alive", "host", 1, 100.0)
    await storage.heartbeat("dying", "host", 2, 100.0)
    mine = await storage.claim(session("s-alive", "alive", limit=1), 100.0)
    theirs = await storage.claim(session("s-dying", "dying", limit=1), 100.0)
    for now in (105.0, 110.0, 114.0):
        await storage.heartbeat("alive", "host", 1, now)
        assert await storage.sweep(now, GRACE) == ([], [])
    await storage.heartbeat("alive", "host", 1, 116.0)
    _, recovered = await storage.sweep(116.0, GRACE)  # "dying" silent since 100: > 15 s
    assert [r.task_id for r in recovered] == [theirs[0].task_id]
    (still,) = await storage.complete(
        [Completion(mine[0].task_id, mine[0].lease_id, "stop")], 117.0
    )
    assert still.code is AckCode.OK
    # A server that shut down is forgotten; its detached leases wait as any others do.
    await storage.remove_server("alive")
    assert await storage.sweep(200.0, GRACE) == ([], [])


async def test_cancel_ends_ready_leased_and_dead_tasks_and_revokes_the_leases(
    storage: Storage,
) -> None:
    await ingest(storage, 4)
    start, _ = await storage.revocations_after(-1)
    leased = await storage.claim(session("s1", limit=2), 10.0)
    (dead,) = await storage.fail([Failure(leased[1].task_id, leased[1].lease_id, "x", True)], 11.0)
    assert dead.result == "dead"
    count, ended = await storage.cancel("w", "a", [], 12.0)
    assert count == 4  # two ready, one leased, one dead
    assert [(e.task_id, e.lease_id, e.session_id) for e in ended] == [
        (leased[0].task_id, leased[0].lease_id, "s1")
    ]
    _, revoked = await storage.revocations_after(start)
    assert [(r.task_id, r.reason) for r in revoked] == [(leased[0].task_id, "cancelled")]
    a = (await storage.backlog("w", 13.0))[0]
    assert (a.cancelled, a.dead, a.ready, a.leased) == (4, 0, 0, 0)
    assert await storage.cancel("w", "", [], 14.0) == (0, [])
    (late,) = await storage.complete(
        [Completion(leased[0].task_id, leased[0].lease_id, "stop")], 15.0
    )
    assert late.code is AckCode.FAILED_PRECONDITION and "cancelled" in late.message
    with pytest.raises(InvalidArgument, match="workflow"):
        await storage.cancel("", "", [], 16.0)


async def test_redrive_revives_dead_tasks_unless_their_run_is_active_again(
    storage: Storage,
) -> None:
    await ingest(storage, 2)
    tasks = await storage.claim(session("s1"), 10.0)
    await storage.fail([Failure(t.task_id, t.lease_id, "x", True) for t in tasks], 11.0)
    # r0 is sent through again; its dead task must stay dead (one active task per run).
    assert await storage.enqueue("w", "", ["r0"], 0, 12.0) == (1, 0)
    assert await storage.redrive("w", "", [], 13.0) == 1
    by_run = {t.agent_run_id: t for t in (await storage.list_tasks("w", "a", None, 0, 10))[0]}
    assert by_run["r1"].state is TaskState.READY and by_run["r1"].attempt == 0
    a = (await storage.backlog("w", 14.0))[0]
    assert (a.ready, a.dead) == (2, 1)
    assert await storage.redrive("w", "a", [tasks[1].task_id], 15.0) == 0  # not dead now
    with pytest.raises(InvalidArgument, match="workflow"):
        await storage.redrive("", "", [], 16.0)


async def test_another_storage_object_sees_and_settles_the_same_leases(
    open_store: OpenStorage,
) -> None:
    one = await open_store()
    two = await open_store()
    await ingest(one, 2)
    marker = await two.change_marker()
    (task,) = await one.claim(session("s1", limit=1), 10.0)
    if marker is not None:
        assert await two.change_marker() != marker  # a commit elsewhere shows
    (ack,) = await two.complete([Completion(task.task_id, task.lease_id, "next")], 11.0)
    assert ack.code is AckCode.OK and ack.next_task_id is not None
    (again,) = await one.complete([Completion(task.task_id, task.lease_id, "next")], 12.0)
    assert again.result == "repeat"
    (other,) = await two.claim(session("s2", limit=5), 13.0)
    assert other.agent_run_id == "r1"
