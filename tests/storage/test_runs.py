"""The storage contract: collections, runs and workflows."""

from __future__ import annotations

import pytest

from agentrun_server._errors import FailedPrecondition, NotFound
from agentrun_server.storage import InsertStatus, NewRun, StageDef, Storage, WorkflowDef

from .conftest import GRADING, ingest


async def test_a_run_is_stored_once_and_a_batch_answers_each_run(storage: Storage) -> None:
    await storage.put_workflow(GRADING, 1.0)
    mine, created = await storage.create_collection("mine", "", "w", 1.0)
    other, _ = await storage.create_collection("other", "", "", 1.0)
    assert created
    await storage.insert_runs(other.id, [NewRun("theirs", None, b"t")], 1.0)
    batch = [
        NewRun("r1", "first", b"1"),
        NewRun("r2", None, b"2"),
        NewRun("r1", None, b"again in the batch"),
        NewRun("theirs", None, b"x"),
    ]
    outcomes = await storage.insert_runs(mine.id, batch, 2.0)
    assert [o.status for o in outcomes] == [
        InsertStatus.ACCEPTED,
        InsertStatus.ACCEPTED,
        InsertStatus.DUPLICATE,
        InsertStatus.CONFLICT,
    ]
    assert outcomes[3].existing_collection_id == other.id
    again = await storage.insert_runs(mine.id, batch[:2], 3.0)
    assert [o.status for o in again] == [InsertStatus.DUPLICATE] * 2
    stored = await storage.get_run("r1")
    assert (stored.data, stored.collection_id, stored.ingested_at) == (b"1", mine.id, 2.0)
    # Each accepted run entered the bound workflow's first stage, once.
    backlog = {s.stage: s for s in await storage.backlog("w", 4.0)}
    assert (backlog["a"].ready, backlog["b"].ready) == (2, 0)
    assert (await storage.get_collection(id=mine.id)).run_count == 2
    assert await storage.count_runs(mine.id) == 2
    with pytest.raises(NotFound, match="no agent run"):
        await storage.get_run("nope")
    with pytest.raises(NotFound, match="no collection"):
        await storage.insert_runs("no-such-collection", batch, 5.0)


async def test_collections_are_created_once_by_name(storage: Storage) -> None:
    await storage.put_workflow(GRADING, 1.0)
    await storage.put_workflow(WorkflowDef("w2", (StageDef("x"),)), 1.0)
    first, created = await storage.create_collection("c", "about c", "w", 1.0)
    same, again = await storage.create_collection("c", "ignored", "", 2.0)
    assert created and not again and same == first
    assert (await storage.get_collection(name="c")).description == "about c"
    with pytest.raises(FailedPrecondition, match="bound to 'w'"):
        await storage.create_collection("c", "", "w2", 3.0)
    with pytest.raises(NotFound, match="no workflow"):
        await storage.create_collection("d", "", "missing", 3.0)
    with pytest.raises(NotFound, match="no collection with name"):
        await storage.get_collection(name="missing")
    await storage.create_collection("b", "", "", 4.0)
    assert [c.name for c in await storage.list_collections()] == ["c", "b"]  # oldest first


async def test_run_pages_follow_ingestion_order_and_stop_at_their_byte_budget(
    storage: Storage,
) -> None:
    collection, _ = await storage.create_collection("c", "", "", 1.0)
    sizes = [300, 300, 300, 1000, 10]
    await storage.insert_runs(
        collection.id, [NewRun(f"r{i}", None, b"x" * n) for i, n in enumerate(sizes)], 1.0
    )
    pages, after = [], 0
    while True:
        page, more = await storage.list_runs(collection.id, after, 10, max_bytes=700)
        pages.append([len(r.data) for r in page])
        if not more:
            break
        after = page[-1].seq
    # A page ends before the run that would cross 700 bytes; a larger run goes alone.
    assert pages == [[300, 300], [300], [1000], [10]]
    page, more = await storage.list_runs(collection.id, 0, 2)
    assert [r.id for r in page] == ["r0", "r1"] and more
    assert await storage.list_runs(collection.id, page[-1].seq + 100, 2) == ([], False)


async def test_a_workflow_gets_a_new_version_only_when_it_changes(storage: Storage) -> None:
    stored, changed = await storage.put_workflow(GRADING, 1.0)
    assert changed and stored.version == 1 and stored.stages == GRADING.stages
    same, changed = await storage.put_workflow(GRADING, 2.0)
    assert not changed and same.version == 1
    longer = WorkflowDef("w", (*GRADING.stages, StageDef("c")))
    newer, changed = await storage.put_workflow(longer, 3.0)
    assert changed and newer.version == 2 and newer.updated_at == 3.0
    assert (await storage.get_workflow("w")).version == 2
    assert [w.name for w in await storage.list_workflows()] == ["w"]
    with pytest.raises(NotFound):
        await storage.get_workflow("missing")


async def test_a_definition_may_not_drop_a_stage_that_holds_tasks(storage: Storage) -> None:
    await ingest(storage, 2)
    with pytest.raises(FailedPrecondition, match="'a' \\(2\\)"):
        await storage.put_workflow(WorkflowDef("w", (StageDef("b"),)), 2.0)
    assert (await storage.get_workflow("w")).version == 1
