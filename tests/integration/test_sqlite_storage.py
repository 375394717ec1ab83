from __future__ import annotations

import asyncio
import itertools
import sys
import time
from pathlib import Path

import pytest

from agentrun_server._errors import FailedPrecondition
from agentrun_server.storage import (
    AckCode,
    ClaimRequest,
    Completion,
    Failure,
    InsertStatus,
    NewRun,
    StageDef,
    WorkflowDef,
    open_storage,
)

WORKFLOW = WorkflowDef(
    "w",
    (
        StageDef("a", {"next": "b", "stop": None}, max_attempts=2, initial_backoff_seconds=0),
        StageDef("b"),
    ),
)


async def test_runs_are_stored_once_and_enter_the_bound_workflow(tmp_path: Path) -> None:
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WORKFLOW, 1.0)
        collection, created = await storage.create_collection("c", "", "w", 1.0)
        assert created
        runs = [NewRun(f"r{i}", None, b"x") for i in range(3)]
        first = await storage.insert_runs(collection.id, runs, 2.0)
        again = await storage.insert_runs(collection.id, runs, 3.0)
        assert [o.status for o in first] == [InsertStatus.ACCEPTED] * 3
        assert [o.status for o in again] == [InsertStatus.DUPLICATE] * 3
        backlog = {s.stage: s for s in await storage.backlog("w", 4.0)}
        assert backlog["a"].ready == 3 and backlog["b"].ready == 0
        await storage.put_workflow(WorkflowDef("w2", (StageDef("x"),)), 5.0)
        with pytest.raises(FailedPrecondition, match="bound to 'w'"):
            await storage.create_collection("c", "", "w2", 5.0)
    finally:
        await storage.close()


async def test_claim_complete_fail_and_fencing(tmp_path: Path) -> None:
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WORKFLOW, 1.0)
        collection, _ = await storage.create_collection("c", "", "w", 1.0)
        await storage.insert_runs(
            collection.id, [NewRun("r1", None, b"1"), NewRun("r2", None, b"2")], 1.0
        )
        leased = await storage.claim(ClaimRequest("s", "w", {"a": 10}, 10, None), 2.0)
        assert [t.run_data for t in leased] == [b"1", b"2"]
        one, two = leased
        acks = await storage.complete([Completion(one.task_id, one.lease_id, "nope")], 3.0)
        assert acks[0].code is AckCode.INVALID_ARGUMENT and "'next', 'stop'" in acks[0].message
        done = await storage.complete([Completion(one.task_id, one.lease_id, "next")], 3.0)
        assert done[0].code is AckCode.OK and done[0].next_task_id is not None
        repeat = await storage.complete([Completion(one.task_id, one.lease_id, "next")], 3.5)
        assert repeat[0].code is AckCode.OK and repeat[0].next_task_id is None
        stale = await storage.complete([Completion(one.task_id, "not-the-lease", "next")], 3.5)
        assert stale[0].code is AckCode.FAILED_PRECONDITION
        # Two attempts allowed: the first failure retries, the second is dead.
        await storage.fail([Failure(two.task_id, two.lease_id, "boom")], 4.0)
        (again,) = await storage.claim(ClaimRequest("s", "w", {"a": 10}, 10, None), 5.0)
        assert (
            again.task_id == two.task_id and again.attempt == 2 and again.lease_id != two.lease_id
        )
        late = await storage.complete([Completion(two.task_id, two.lease_id, "next")], 5.0)
        assert late[0].code is AckCode.FAILED_PRECONDITION
        await storage.fail([Failure(again.task_id, again.lease_id, "boom")], 6.0)
        backlog = {s.stage: s for s in await storage.backlog("w", 7.0)}
        assert (backlog["a"].done, backlog["a"].dead, backlog["b"].ready) == (1, 1, 1)
        task = await storage.get_task(two.task_id)
        assert [f.error for f in task.failures] == ["boom", "boom"]
    finally:
        await storage.close()


async def test_settling_and_claiming_take_turns_with_ingestion(tmp_path: Path) -> None:
    # Claims and completions run on the event loop's thread, inserts on the storage thread: the
    # two must take turns on the write lock without either failing or losing a task.
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WorkflowDef("one", (StageDef("a"),)), 1.0)
        collection, _ = await storage.create_collection("c", "", "one", 1.0)

        async def ingest() -> None:
            for batch in range(20):
                runs = [NewRun(f"r{batch}-{i}", None, b"x" * 1000) for i in range(100)]
                await storage.insert_runs(collection.id, runs, 2.0)

        done: list[int] = []

        async def work() -> None:
            while len(done) < 2000:
                leased = await storage.claim(ClaimRequest("s", "one", {"a": 50}, 50, None), 3.0)
                acks = await storage.complete(
                    [Completion(t.task_id, t.lease_id, "") for t in leased], 3.0
                )
                assert all(ack.code is AckCode.OK for ack in acks)
                done.extend(t.task_id for t in leased)
                await asyncio.sleep(0)

        await asyncio.wait_for(asyncio.gather(ingest(), work()), 60)
        assert len(done) == len(set(done)) == 2000
        (stage,) = await storage.backlog("one", 4.0)
        assert (stage.done, stage.ready, stage.leased) == (2000, 0, 0)
    finally:
        await storage.close()


async def test_a_write_lock_held_by_another_process_never_blocks_the_event_loop(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite"
    storage = await open_storage(f"sqlite:///{db}")
    holder = None
    try:
        await storage.put_workflow(WORKFLOW, 1.0)
        collection, _ = await storage.create_collection("c", "", "w", 1.0)
        await storage.insert_runs(collection.id, [NewRun("r1", None, b"1")], 1.0)
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLD_WRITE_LOCK,
            str(db),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert holder.stdout is not None and holder.stdin is not None
        assert await holder.stdout.readline() == b"held\n"
        claim = asyncio.create_task(storage.claim(ClaimRequest("s", "w", {"a": 1}, 1, None), 2.0))
        ticks = []
        for _ in range(30):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < 0.1, f"the event loop stalled {max(gaps):.3f} s"
        assert not claim.done()  # waiting for the lock, on the storage thread
        holder.stdin.write(b"\n")
        await holder.stdin.drain()
        (leased,) = await asyncio.wait_for(claim, 10)
        assert leased.run_data == b"1"
    finally:
        if holder is not None:
            if holder.returncode is None:
                holder.kill()
            await holder.communicate()  # reaps it and closes its pipes
        await storage.close()


HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


async def test_a_claim_stops_at_its_byte_budget_but_always_takes_one(tmp_path: Path) -> None:
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WorkflowDef("one", (StageDef("a"),)), 1.0)
        collection, _ = await storage.create_collection("c", "", "one", 1.0)
        sizes = [300, 300, 300, 1000, 10]
        await storage.insert_runs(
            collection.id, [NewRun(f"r{i}", None, b"x" * n) for i, n in enumerate(sizes)], 1.0
        )
        batches = []
        for _ in range(4):
            request = ClaimRequest("s", "one", {"a": 10}, 10, None, max_bytes=700)
            batches.append([len(t.run_data) for t in await storage.claim(request, 2.0)])
        # FIFO order kept; a batch ends before the run that would cross 700 bytes; the 1,000-byte
        # run, over the budget on its own, goes alone.
        assert batches == [[300, 300], [300], [1000], [10]]
    finally:
        await storage.close()


async def test_a_claim_of_more_tasks_than_sqlite_takes_parameters_leases_them_all(
    tmp_path: Path,
) -> None:
    # 20,000 leases in one claim: over SQLite's 32,766 parameters at two per task, were it one
    # statement (credits are the worker's to choose; SqliteStorage pins that limit on any build).
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WorkflowDef("one", (StageDef("a"),)), 1.0)
        collection, _ = await storage.create_collection("c", "", "one", 1.0)
        for start in range(0, 20_000, 1000):
            runs = [NewRun(f"r{i}", None, b"x") for i in range(start, start + 1000)]
            await storage.insert_runs(collection.id, runs, 1.0)
        leased = await storage.claim(ClaimRequest("s", "one", {"a": 20_000}, 20_000, None), 2.0)
        assert len({t.task_id for t in leased}) == 20_000
        assert {t.run_data for t in leased} == {b"x"}
        # As many ids named at once: cancel (and redrive) look them up in slices too.
        count, ended = await storage.cancel("", "", [t.task_id for t in leased], 3.0)
        assert count == len(ended) == 20_000  # every one leased: each lease ended is reported
        assert {e.lease_id for e in ended} == {t.lease_id for t in leased}
    finally:
        await storage.close()
