from __future__ import annotations

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
