"""The storage contract: enqueue, claim, and the settles (complete, fail, extend, release)."""

from __future__ import annotations

from typing import Any

import pytest

from agentrun_server._errors import NotFound
from agentrun_server.storage import (
    AckCode,
    ClaimRequest,
    Completion,
    Extension,
    Failure,
    NewRun,
    Release,
    StageDef,
    Storage,
    TaskState,
    WorkflowDef,
)
from agentrun_server.storage.sqlite import SqliteStorage
from agentrun_server.storage.sqlite._statements import SqliteStatements

from .conftest import ingest

OK, INVALID, MISSING, STALE = (
    AckCode.OK,
    AckCode.INVALID_ARGUMENT,
    AckCode.NOT_FOUND,
    AckCode.FAILED_PRECONDITION,
)


def request(
    limit: int = 10,
    stages: dict[str, int] | None = None,
    lease_seconds: float | None = None,
    max_bytes: int | None = None,
) -> ClaimRequest:
    return ClaimRequest("s", "w", stages or {"a": limit}, limit, lease_seconds, max_bytes)


async def test_a_claim_takes_priority_first_then_fifo_within_each_stages_limit(
    storage: Storage,
) -> None:
    collection = await ingest(storage, 3, now=1.0)  # r0..r2 at stage a, priority 0
    await storage.insert_runs(collection, [NewRun(f"late{i}", None, b"l") for i in range(2)], 2.0)
    await storage.insert_runs(collection, [NewRun("urgent", None, b"u")], 3.0)
    # A run's task may be re-enqueued elsewhere only once the first is settled: use stage b.
    enqueued, skipped = await storage.enqueue("w", "b", ["urgent", "r0"], 5, 3.0)
    assert (enqueued, skipped) == (0, 2)  # both have a ready task in the workflow already
    first = await storage.claim(request(2, {"a": 2}), 4.0)
    assert [t.agent_run_id for t in first] == ["r0", "r1"]
    done = await storage.complete([Completion(t.task_id, t.lease_id, "stop") for t in first], 4.0)
    assert [a.code for a in done] == [OK, OK]
    assert await storage.enqueue("w", "b", ["r0", "r1"], 5, 5.0) == (2, 0)
    leased = await storage.claim(request(10, {"a": 2, "b": 10}), 6.0)
    # Priority 5 (stage b) first, then FIFO; stage a within its own limit of 2.
    assert [(t.stage, t.agent_run_id) for t in leased] == [
        ("b", "r0"),
        ("b", "r1"),
        ("a", "r2"),
        ("a", "late0"),
    ]
    assert len({t.lease_id for t in leased}) == 4
    assert all(t.attempt == 1 and t.max_attempts == (2 if t.stage == "a" else 4) for t in leased)
    assert {t.stage: t.deadline for t in leased} == {"a": 36.0, "b": 66.0}  # stage leases
    again = await storage.claim(request(10, {"a": 10, "b": 10}, lease_seconds=5.0), 7.0)
    assert [t.agent_run_id for t in again] == ["late1", "urgent"]
    assert {t.deadline for t in again} == {12.0}  # the request's lease duration
    assert await storage.claim(request(10, {"a": 10, "b": 10}), 8.0) == []


async def test_a_claim_stops_at_its_byte_budget_but_always_takes_one(storage: Storage) -> None:
    await storage.put_workflow(WorkflowDef("w", (StageDef("a"),)), 1.0)
    collection, _ = await storage.create_collection("c", "", "w", 1.0)
    sizes = [300, 300, 300, 1000, 10]
    await storage.insert_runs(
        collection.id, [NewRun(f"r{i}", None, b"x" * n) for i, n in enumerate(sizes)], 1.0
    )
    batches = [
        [len(t.run_data) for t in await storage.claim(request(10, max_bytes=700), 2.0)]
        for _ in range(4)
    ]
    assert batches == [[300, 300], [300], [1000], [10]]


async def test_a_completion_routes_the_run_to_its_next_stage_with_the_output(
    storage: Storage,
) -> None:
    await ingest(storage, 2)
    one, two = await storage.claim(request(), 2.0)
    acks = await storage.complete(
        [
            Completion(one.task_id, one.lease_id, "next", b"output"),
            Completion(two.task_id, two.lease_id, "stop"),
        ],
        3.0,
    )
    assert [(a.code, a.result) for a in acks] == [(OK, "done"), (OK, "done")]
    assert acks[0].next_task_id is not None and acks[1].next_task_id is None
    follow = await storage.get_task(acks[0].next_task_id)
    assert (follow.stage, follow.state, follow.input, follow.previous_task_id) == (
        "b",
        TaskState.READY,
        b"output",
        one.task_id,
    )
    (leased,) = await storage.claim(request(stages={"b": 10}), 4.0)
    assert (leased.task_id, leased.input, leased.run_data) == (follow.id, b"output", one.run_data)
    finished = await storage.get_task(one.task_id)
    assert (finished.state, finished.pathway, finished.output) == (
        TaskState.DONE,
        "next",
        b"output",
    )


async def test_settles_are_fenced_by_the_current_lease_and_repeats_answered_the_same(
    storage: Storage,
) -> None:
    await ingest(storage, 1)
    (task,) = await storage.claim(request(), 2.0)
    tid, lease = task.task_id, task.lease_id
    # A pathway the stage lacks: refused, the lease kept, valid pathways named.
    (bad,) = await storage.complete([Completion(tid, lease, "nope")], 3.0)
    assert bad.code is INVALID and "'next', 'stop'" in bad.message
    for settle in (
        storage.complete([Completion(tid, "not-the-lease", "next")], 3.0),
        storage.fail([Failure(tid, "not-the-lease", "boom")], 3.0),
        storage.extend([Extension(tid, "not-the-lease")], 3.0),
        storage.release([Release(tid, "not-the-lease")], 3.0),
    ):
        (ack,) = await settle
        assert ack.code is STALE and "under another lease" in ack.message
    (missing,) = await storage.complete([Completion(10_000, lease, "next")], 3.0)
    assert missing.code is MISSING
    first, repeat_in_batch = await storage.complete(
        [Completion(tid, lease, "next"), Completion(tid, lease, "next")], 4.0
    )
    assert (first.result, repeat_in_batch.result) == ("done", "repeat")
    # The same answer: with the task the first made (the conformance scenario found it missing).
    assert first.next_task_id is not None
    assert repeat_in_batch.next_task_id == first.next_task_id
    (repeat,) = await storage.complete([Completion(tid, lease, "next")], 5.0)
    assert repeat.code is OK and repeat.result == "repeat"
    assert repeat.next_task_id == first.next_task_id
    (other_pathway,) = await storage.complete([Completion(tid, lease, "stop")], 5.0)
    assert other_pathway.code is STALE and "is done" in other_pathway.message
    for settle in (
        storage.fail([Failure(tid, lease, "late")], 5.0),
        storage.release([Release(tid, lease)], 5.0),
        storage.extend([Extension(tid, lease)], 5.0),
    ):
        assert (await settle)[0].code is STALE
    assert (await storage.backlog("w", 6.0))[1].ready == 1  # one next-stage task, not two


async def test_a_failure_retries_after_backoff_until_the_attempts_run_out(storage: Storage) -> None:
    await ingest(storage, 3)  # stage a: 2 attempts, backoff 10 s doubling to 100 s
    one, two = await storage.claim(request(2), 100.0)
    acks = await storage.fail(
        [
            Failure(one.task_id, one.lease_id, "boom"),
            Failure(two.task_id, two.lease_id, "slow down", retry_after_seconds=500.0),
        ],
        101.0,
    )
    assert [(a.code, a.result) for a in acks] == [(OK, "retry"), (OK, "retry")]
    (repeat,) = await storage.fail([Failure(one.task_id, one.lease_id, "boom")], 102.0)
    assert repeat.code is OK and repeat.result == "repeat"
    retried = await storage.get_task(one.task_id)
    assert 101.0 + 8.0 <= retried.ready_at <= 101.0 + 12.0  # 10 s +- 20 %
    assert (await storage.get_task(two.task_id)).ready_at == 601.0
    leased = {t.agent_run_id: t for t in await storage.claim(request(), 200.0)}
    assert sorted(leased) == ["r0", "r2"]  # r1 waits for its retry-after
    again, third = leased["r0"], leased["r2"]
    assert (again.task_id, again.attempt, third.attempt) == (one.task_id, 2, 1)
    acks = await storage.fail(
        [
            Failure(again.task_id, again.lease_id, "boom twice"),
            Failure(third.task_id, third.lease_id, "bad input", non_retryable=True),
        ],
        201.0,
    )
    assert [a.result for a in acks] == ["dead", "dead"]  # attempts spent; non-retryable
    task = await storage.get_task(one.task_id)
    assert task.state is TaskState.DEAD
    assert [(f.attempt, f.error) for f in task.failures] == [(1, "boom"), (2, "boom twice")]
    a = (await storage.backlog("w", 202.0))[0]
    assert (a.dead, a.scheduled, a.ready) == (2, 1, 0)


async def test_extend_moves_the_deadline_and_release_costs_no_attempt(storage: Storage) -> None:
    await ingest(storage, 1)
    (task,) = await storage.claim(request(), 10.0)
    assert task.deadline == 40.0
    (default,) = await storage.extend([Extension(task.task_id, task.lease_id)], 20.0)
    (longer,) = await storage.extend([Extension(task.task_id, task.lease_id, 100.0)], 21.0)
    assert (default.deadline, longer.deadline) == (50.0, 121.0)
    (released,) = await storage.release([Release(task.task_id, task.lease_id)], 22.0)
    (repeat,) = await storage.release([Release(task.task_id, task.lease_id)], 22.5)
    assert (released.result, repeat.code, repeat.result) == ("released", OK, "repeat")
    (again,) = await storage.claim(request(), 23.0)
    assert again.task_id == task.task_id and again.attempt == 1
    assert again.lease_id != task.lease_id
    (stale,) = await storage.release([Release(task.task_id, task.lease_id)], 24.0)
    assert stale.code is STALE


async def test_complete_and_claim_leases_the_freed_credits_in_the_same_call(
    storage: Storage,
) -> None:
    await ingest(storage, 5)
    first = await storage.claim(request(2), 2.0)
    completions = [Completion(first[0].task_id, first[0].lease_id, "stop")]
    completions.append(Completion(first[1].task_id, first[1].lease_id, "nope"))  # kept
    acks, leased = await storage.complete_and_claim(completions, request(2), 3.0)
    assert [a.code for a in acks] == [OK, INVALID]
    assert [t.agent_run_id for t in leased] == ["r2"]  # 2 freed, less the one kept


async def test_enqueue_skips_runs_with_an_active_task_and_names_an_unknown_run(
    storage: Storage,
) -> None:
    await ingest(storage, 3)
    assert await storage.enqueue("w", "", ["r0", "r0"], 0, 2.0) == (0, 1)
    (task,) = await storage.claim(request(1), 3.0)
    await storage.complete([Completion(task.task_id, task.lease_id, "stop")], 4.0)
    assert await storage.enqueue("w", "b", ["r0", "r1"], 7, 5.0) == (1, 1)
    (follow,) = await storage.claim(request(stages={"b": 10}), 6.0)
    assert (follow.agent_run_id, follow.priority) == ("r0", 7)
    with pytest.raises(NotFound, match="'ghost'"):
        await storage.enqueue("w", "", ["r2", "ghost"], 0, 7.0)
    with pytest.raises(NotFound, match="no stage"):
        await storage.enqueue("w", "zzz", ["r2"], 0, 7.0)
    assert (await storage.backlog("w", 8.0))[0].ready == 2  # nothing of the failed calls landed


async def test_task_pages_stop_at_their_byte_budget(storage: Storage) -> None:
    await ingest(storage, 4)
    tasks = await storage.claim(request(), 2.0)
    outputs = [b"x" * 400, b"x" * 400, b"x" * 1000, b""]
    await storage.complete(
        [Completion(t.task_id, t.lease_id, "next", o) for t, o in zip(tasks, outputs, strict=True)],
        3.0,
    )
    sizes, after = [], 0
    while True:
        page, more = await storage.list_tasks("w", "a", TaskState.DONE, after, 10, max_bytes=900)
        sizes.append([len(t.output or b"") for t in page])
        if not more:
            break
        after = page[-1].id
    assert sizes == [[400, 400], [1000], [0]]
    b_tasks, _ = await storage.list_tasks("w", "b", None, 0, 10)
    assert [t.input for t in b_tasks] == outputs


async def test_a_runs_tasks_are_listed_through_every_stage_by_its_id(storage: Storage) -> None:
    await ingest(storage, 3)
    tasks = await storage.claim(request(), 2.0)
    await storage.complete([Completion(t.task_id, t.lease_id, "next", b"") for t in tasks], 3.0)
    r1 = [t for t in (await storage.list_tasks("", "", None, 0, 10, agent_run_id="r1"))[0]]
    assert [(t.stage, t.state, t.agent_run_id) for t in r1] == [
        ("a", TaskState.DONE, "r1"),
        ("b", TaskState.READY, "r1"),
    ]
    only_b, more = await storage.list_tasks("w", "b", None, 0, 10, agent_run_id="r1")
    assert [t.id for t in only_b] == [r1[1].id] and not more
    assert (await storage.list_tasks("", "", None, 0, 10, agent_run_id="ghost"))[0] == []


async def test_a_release_may_ask_to_run_again_later_at_no_attempts_cost(storage: Storage) -> None:
    await ingest(storage, 1)
    (task,) = await storage.claim(request(), 10.0)
    (released,) = await storage.release([Release(task.task_id, task.lease_id, 30.0)], 11.0)
    assert released.result == "released"
    later = await storage.get_task(task.task_id)
    assert (later.state, later.ready_at, later.attempt) == (TaskState.READY, 41.0, 0)
    assert await storage.claim(request(), 40.0) == []
    (again,) = await storage.claim(request(), 41.0)
    assert again.task_id == task.task_id and again.attempt == 1
    assert (await storage.get_task(task.task_id)).failures == ()


async def test_a_completion_that_loses_a_race_is_answered_from_the_task_as_it_stands(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between a batch's read and its guarded write another writer may settle one of its tasks
    # (never within one SQLite transaction; always possible where replicas do not take turns).
    # Here the engine's read is made to see a lease the task no longer holds: the write moves
    # only the other, and the loser is answered from the task as it stands.
    statements: Any
    if isinstance(storage, SqliteStorage):
        statements = SqliteStatements
    else:
        from agentrun_server.storage.postgres._statements import PostgresStatements

        statements = PostgresStatements
    await ingest(storage, 2)
    one, two = await storage.claim(request(2), 2.0)
    await storage.release([Release(two.task_id, two.lease_id)], 3.0)
    real = statements.settle_rows
    reads = []

    async def first_read_is_stale(self: Any, ids: Any) -> Any:
        rows = await real(self, ids)
        if not reads:
            rows = {k: v._replace(state="leased") for k, v in rows.items()}
        reads.append(ids)
        return rows

    monkeypatch.setattr(statements, "settle_rows", first_read_is_stale)
    acks = await storage.complete(
        [Completion(t.task_id, t.lease_id, "next") for t in (one, two)], 4.0
    )
    assert [(a.code, a.result) for a in acks] == [(OK, "done"), (STALE, "")]
    assert "is ready" in acks[1].message and acks[0].next_task_id is not None
    a, b = await storage.backlog("w", 5.0)
    assert (a.done, a.ready, b.ready) == (1, 1, 1)
