"""The storage contract: deleting runs and collections, by request and by retention."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agentrun_server._errors import FailedPrecondition, NotFound
from agentrun_server.storage import (
    AckCode,
    ClaimRequest,
    Completion,
    Facet,
    Failure,
    Folded,
    NewEvent,
    NewRun,
    RunFilter,
    RunQuery,
    RunSelection,
    Storage,
)

from .conftest import OpenStorage, ingest

DAY = 86_400.0


def session(name: str, limit: int = 10) -> ClaimRequest:
    return ClaimRequest(name, "w", {"a": limit}, limit, None)


def fold(run_id: str, parts: Sequence[bytes]) -> Folded:
    return Folded(b"".join(parts), None)


async def test_deleting_runs_takes_their_tasks_events_and_facets_and_keeps_the_counts(
    storage: Storage,
) -> None:
    collection_id = await ingest(storage, 4)  # r0..r3, each a ready task of stage a
    await storage.insert_runs(
        collection_id, [NewRun("scored", None, b"s", (Facet("scores.reward", 0.0, None),))], 1.0
    )
    leased = await storage.claim(session("s1"), 2.0)
    by_run = {t.agent_run_id: t for t in leased}
    # r0 done (moved on to b), r1 dead: ended tasks are counted in the backlog.
    await storage.complete([Completion(by_run["r0"].task_id, by_run["r0"].lease_id, "next")], 3.0)
    await storage.fail([Failure(by_run["r1"].task_id, by_run["r1"].lease_id, "no", True)], 3.0)
    await storage.complete(
        [Completion(by_run[r].task_id, by_run[r].lease_id, "stop") for r in ("r2", "r3", "scored")],
        3.0,
    )
    before = {(s.stage): s for s in await storage.backlog("w", 4.0)}
    assert (before["a"].done, before["a"].dead, before["b"].ready) == (4, 1, 1)

    deleted = await storage.delete_runs(RunSelection(run_ids=["r0", "r1", "nope"]), False, 10, 5.0)
    assert sorted(deleted.run_ids) == ["r0", "r1"]
    assert deleted.tasks == 3  # r0's tasks in a and b, r1's dead one
    assert (deleted.revoked, deleted.more) == ([], False)
    for run_id in ("r0", "r1"):
        with pytest.raises(NotFound):
            await storage.get_run(run_id)
    after = {(s.stage): s for s in await storage.backlog("w", 6.0)}
    assert (after["a"].done, after["a"].dead, after["b"].ready) == (3, 0, 0)
    assert (await storage.get_collection(id=collection_id)).run_count == 3
    # The facets went with the run; the others' remain.
    scored = RunQuery(collection_id, filters=(RunFilter("scores.reward", "<", 1.0, None),))
    assert [r.id for r in (await storage.list_runs(scored, 0, 10)).items] == ["scored"]
    await storage.delete_runs(RunSelection(run_ids=["scored"]), False, 10, 7.0)
    assert (await storage.list_runs(scored, 0, 10)).items == []
    # A deleted task cannot be settled, and the id can be stored again, anywhere.
    (late,) = await storage.complete(
        [Completion(by_run["r0"].task_id, by_run["r0"].lease_id, "next")], 8.0
    )
    assert late.code is AckCode.NOT_FOUND
    outcome = await storage.insert_runs(collection_id, [NewRun("r0", None, b"again")], 9.0)
    assert outcome[0].status.name == "ACCEPTED"


async def test_a_leased_task_refuses_the_deletion_unless_forced(storage: Storage) -> None:
    await ingest(storage, 3)
    start, _ = await storage.revocations_after(-1)
    leased = await storage.claim(session("s1", limit=1), 2.0)
    (held,) = leased
    assert [t.run_id for t in await storage.leased_tasks(RunSelection(run_ids=["r0", "r1"]))] == [
        held.agent_run_id
    ]
    with pytest.raises(FailedPrecondition, match=r"1 task\(s\) of 1 run\(s\).*leased \(1 in w/a"):
        await storage.delete_runs(RunSelection(run_ids=["r0", "r1", "r2"]), False, 10, 3.0)
    assert len((await storage.list_runs(RunQuery(held.collection_id), 0, 10)).items) == 3
    deleted = await storage.delete_runs(RunSelection(run_ids=["r0", "r1", "r2"]), True, 10, 4.0)
    assert len(deleted.run_ids) == 3
    assert [(e.task_id, e.lease_id) for e in deleted.revoked] == [(held.task_id, held.lease_id)]
    _, revoked = await storage.revocations_after(start)
    assert [(r.task_id, r.session_id, r.reason) for r in revoked] == [
        (held.task_id, "s1", "cancelled")
    ]
    backlog = {s.stage: s for s in await storage.backlog("w", 5.0)}
    assert (backlog["a"].ready, backlog["a"].leased, backlog["a"].cancelled) == (0, 0, 0)


async def test_a_collection_goes_in_batches_then_its_name_is_free(storage: Storage) -> None:
    collection_id = await ingest(storage, 5)
    await storage.append_events(
        [NewEvent("live", 1, collection_id, b"p1", False)], fold, 1 << 20, 1.5
    )
    first = await storage.delete_collection(collection_id, False, 4, 2.0)
    assert (len(first.run_ids), first.more) == (4, True)
    second = await storage.delete_collection(collection_id, False, 4, 3.0)
    assert (len(second.run_ids), second.more) == (2, False)
    with pytest.raises(NotFound):
        await storage.get_collection(id=collection_id)
    with pytest.raises(NotFound):
        await storage.delete_collection(collection_id, False, 4, 4.0)
    with pytest.raises(NotFound):
        await storage.events_after("live", 0, 10)
    backlog = {s.stage: s for s in await storage.backlog("w", 5.0)}
    assert backlog["a"].ready == 0
    again, created = await storage.create_collection("c", "", "", 6.0)
    assert created and again.id != collection_id and again.run_count == 0


async def test_runs_older_than_a_time_go_oldest_first_in_batches(storage: Storage) -> None:
    await ingest(storage, 0)
    collection = await storage.get_collection(name="c")
    for day in range(5):
        await storage.insert_runs(collection.id, [NewRun(f"d{day}", None, b"x")], day * DAY)
    selection = RunSelection(collection_id=collection.id, ingested_before=3 * DAY)
    first = await storage.delete_runs(selection, False, 2, 10 * DAY)
    assert (first.run_ids, first.more) == (["d0", "d1"], True)
    second = await storage.delete_runs(selection, False, 2, 10 * DAY)
    assert (second.run_ids, second.more) == (["d2"], False)
    left = await storage.list_runs(RunQuery(collection.id), 0, 10)
    assert [r.id for r in left.items] == ["d3", "d4"]


async def test_retention_deletes_expired_runs_but_not_while_leased(storage: Storage) -> None:
    await ingest(storage, 0)
    kept, _ = await storage.create_collection("kept", "", "", 0.0)
    short, _ = await storage.create_collection("short", "", "w", 0.0, retention_days=2)
    assert short.retention_days == 2
    for day in range(4):
        await storage.insert_runs(short.id, [NewRun(f"s{day}", None, b"x")], day * DAY)
        await storage.insert_runs(kept.id, [NewRun(f"k{day}", None, b"x")], day * DAY)
    (held,) = await storage.claim(session("s1", limit=1), 4 * DAY)  # s0's task
    assert held.agent_run_id == "s0"
    # At day 4.5, s0..s2 are past two days: s0 is passed over while its task is leased.
    deleted = await storage.delete_expired(4.5 * DAY, 100)
    assert sorted(r.id for r in deleted) == ["s1", "s2"]
    assert await storage.delete_expired(4.5 * DAY, 100) == []
    await storage.complete([Completion(held.task_id, held.lease_id, "stop")], 4.6 * DAY)
    assert [r.id for r in await storage.delete_expired(4.7 * DAY, 100)] == ["s0"]
    assert (await storage.get_collection(id=kept.id)).run_count == 4
    # A retention set later applies at the next sweep; 0 keeps runs again.
    updated = await storage.update_collection(kept.id, retention_days=1)
    assert (updated.retention_days, updated.description) == (1, "")
    assert len(await storage.delete_expired(4.7 * DAY, 2)) == 2  # the limit holds
    await storage.update_collection(kept.id, "about kept", 0)
    assert [r.id for r in await storage.delete_expired(9 * DAY, 100)] == ["s3"]  # not kept's
    after = await storage.get_collection(id=kept.id)
    assert (after.description, after.run_count, after.retention_days) == ("about kept", 2, 0)
    with pytest.raises(NotFound):
        await storage.update_collection("nope", retention_days=3)


async def test_replicas_sweeping_at_once_delete_each_run_once(open_store: OpenStorage) -> None:
    first, second = await open_store(), await open_store()
    await ingest(first, 0)
    collection, _ = await first.create_collection("old", "", "", 0.0, retention_days=1)
    runs = [NewRun(f"o{i}", None, b"x") for i in range(300)]
    await first.insert_runs(collection.id, runs, 0.0)

    async def sweep(storage: Storage) -> list[str]:
        ids: list[str] = []
        while batch := await storage.delete_expired(3 * DAY, 50):
            ids += [r.id for r in batch]
        return ids

    one, two = await asyncio.gather(sweep(first), sweep(second))
    assert sorted(one + two) == sorted(r.id for r in runs)
    assert not set(one) & set(two)
    assert (await first.get_collection(id=collection.id)).run_count == 0
