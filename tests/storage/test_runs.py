"""The storage contract: collections, runs and workflows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agentrun_server._errors import FailedPrecondition, NotFound
from agentrun_server.storage import (
    Facet,
    InsertStatus,
    NewRun,
    RunFilter,
    RunQuery,
    StageDef,
    Storage,
    WorkflowDef,
    open_storage,
)
from agentrun_server.storage._run_query import LISTED_RUN_COLUMNS, runs_sql

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
    assert await storage.run_size("r1") == (mine.id, 1)  # read without the run's data
    with pytest.raises(NotFound, match="no agent run"):
        await storage.run_size("nope")
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
        page, more = await storage.list_runs(RunQuery(collection.id), after, 10, max_bytes=700)
        pages.append([len(r.data) for r in page])
        if not more:
            break
        after = page[-1].seq
    # A page ends before the run that would cross 700 bytes; a larger run goes alone.
    assert pages == [[300, 300], [300], [1000], [10]]
    page, more = await storage.list_runs(RunQuery(collection.id), 0, 2)
    assert [r.id for r in page] == ["r0", "r1"] and more
    assert await storage.list_runs(RunQuery(collection.id), page[-1].seq + 100, 2) == ([], False)


async def test_a_workflow_gets_a_new_version_only_when_it_changes(storage: Storage) -> None:
    stored, changed, _ = await storage.put_workflow(GRADING, 1.0)
    assert changed and stored.version == 1 and stored.stages == GRADING.stages
    same, changed, _ = await storage.put_workflow(GRADING, 2.0)
    assert not changed and same.version == 1
    longer = WorkflowDef("w", (*GRADING.stages, StageDef("c")))
    newer, changed, _ = await storage.put_workflow(longer, 3.0)
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


def _scored(i: int, reward: float, model: str) -> NewRun:
    facets = (Facet("scores.reward", reward, None), Facet("metadata.model", None, model))
    return NewRun(f"r{i}", None, b"x", facets)


async def test_a_filtered_listing_pages_newest_first_through_the_matches(
    storage: Storage,
) -> None:
    """Each filter, alone and together, in both orders, paged a few runs at a time; runs of
    another collection with the same facets never leak in."""
    mine, _ = await storage.create_collection("mine", "", "", 1.0)
    other, _ = await storage.create_collection("other", "", "", 1.0)
    runs = [_scored(i, i % 3 / 2, "gpt-4o" if i % 2 else "claude") for i in range(30)]
    await storage.insert_runs(mine.id, runs, 1.0)
    await storage.insert_runs(other.id, [_scored(100 + i, 0.0, "gpt-4o") for i in range(5)], 1.0)

    async def listed(*filters: RunFilter, newest_first: bool = False) -> list[str]:
        query = RunQuery(mine.id, filters=filters, newest_first=newest_first)
        ids, after = [], 0
        while True:
            page, more = await storage.list_runs(query, after, 4)
            ids += [r.id for r in page]
            if not more:
                return ids
            after = page[-1].seq

    every = [f"r{i}" for i in range(30)]
    assert await listed() == every
    assert await listed(newest_first=True) == every[::-1]
    low = RunFilter("scores.reward", "<", 1.0, None)
    gpt = RunFilter("metadata.model", "=", None, "gpt-4o")
    not_gpt = RunFilter("metadata.model", "!=", None, "gpt-4o")
    assert await listed(low) == [f"r{i}" for i in range(30) if i % 3 != 2]
    assert await listed(gpt, newest_first=True) == [f"r{i}" for i in range(29, -1, -1) if i % 2]
    assert await listed(not_gpt) == [f"r{i}" for i in range(30) if i % 2 == 0]
    both = [f"r{i}" for i in range(29, -1, -1) if i % 2 and i % 3 != 2]
    assert await listed(gpt, low, newest_first=True) == both
    assert await listed(low, gpt, newest_first=True) == both  # either filter may drive
    exact = RunFilter("scores.reward", "=", 0.5, None)
    assert await listed(exact) == [f"r{i}" for i in range(30) if i % 3 == 1]
    assert await listed(RunFilter("scores.missing", ">=", 0.0, None)) == []


@pytest.mark.parametrize("newest_first", [False, True])
@pytest.mark.parametrize(
    "driver",
    [RunFilter("metadata.model", "=", None, "gpt-4o"), RunFilter("scores.reward", "=", 0.5, None)],
    ids=["text", "number"],
)
async def test_an_equality_filter_reads_its_page_in_run_order_from_one_facet_index_on_sqlite(
    tmp_path: Path, driver: RunFilter, newest_first: bool
) -> None:
    """SQLite's plan for a listing driven by an equality filter, with or without a second
    filter and a cursor: a search of `run_facets_by_value` in run order (no sort of the matches,
    whose count a collection does not bound), each run then found by its key."""
    storage = await open_storage(f"sqlite:///{tmp_path / 'plan.db'}")
    await storage.close()
    other = RunFilter("scores.reward", "<", 1.0, None)
    with sqlite3.connect(tmp_path / "plan.db") as db:
        for filters in ((driver,), (driver, other), (other, driver)):
            args: list[object] = []

            def take(value: object, args: list[object] = args) -> str:
                args.append(value)
                return "?"

            query = RunQuery("c", filters=filters, newest_first=newest_first)
            sql = runs_sql(query, LISTED_RUN_COLUMNS, 7, None, 50, take)
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
            assert plan[0].startswith("SEARCH d USING COVERING INDEX run_facets_by_value"), plan
            assert not any("TEMP B-TREE" in step for step in plan), plan


async def test_a_batch_of_new_and_stored_runs_files_each_new_runs_facets_under_it(
    storage: Storage,
) -> None:
    """Runs stored already are skipped in a batch, and each new run's facets stay its own."""
    mine, _ = await storage.create_collection("mine", "", "", 1.0)
    await storage.insert_runs(mine.id, [_scored(i, 0.0, "old") for i in range(0, 10, 3)], 1.0)
    batch = [_scored(i, float(i), f"m{i}") for i in range(10)]
    outcomes = await storage.insert_runs(mine.id, batch, 2.0)
    assert [o.status for o in outcomes] == [
        InsertStatus.DUPLICATE if i % 3 == 0 else InsertStatus.ACCEPTED for i in range(10)
    ]
    for i in range(10):
        found, _ = await storage.list_runs(
            RunQuery(mine.id, filters=(RunFilter("scores.reward", "=", float(i), None),)), 0, 10
        )
        model = "old" if i % 3 == 0 else f"m{i}"
        by_model, _ = await storage.list_runs(
            RunQuery(mine.id, filters=(RunFilter("metadata.model", "=", None, model),)), 0, 10
        )
        if i % 3 == 0:  # stored before with reward 0 and model "old": its new facets are not
            assert [r.id for r in found] == (["r0", "r3", "r6", "r9"] if i == 0 else [])
            assert [r.id for r in by_model] == ["r0", "r3", "r6", "r9"]
        else:
            assert [r.id for r in found] == [f"r{i}"]
            assert [r.id for r in by_model] == [f"r{i}"]


def _reset_backfill(database_url: str) -> None:
    """The backfill's record as the migration leaves it: every run so far to be indexed."""
    sql = "UPDATE run_facets_backfill SET done = 0, through = (SELECT max(seq) FROM agent_runs)"
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
            db.execute(sql)
    else:
        import psycopg

        with psycopg.connect(database_url, autocommit=True) as db:
            db.execute(sql)


async def test_facets_are_backfilled_for_runs_stored_before_they_existed(
    storage: Storage, database_url: str
) -> None:
    """Runs whose facets were never written (as after the migration) are indexed by
    `backfill_facets`, a batch at a time, and are then found by filters."""
    collection, _ = await storage.create_collection("c", "", "", 1.0)
    await storage.insert_runs(
        collection.id, [NewRun(f"r{i}", None, b"%d" % i) for i in range(7)], 1.0
    )
    low = RunQuery(collection.id, filters=(RunFilter("scores.n", "<", 3.0, None),))
    assert await storage.list_runs(low, 0, 10) == ([], False)  # no facets written with them
    # As the migration leaves it: every run so far is to be indexed.
    _reset_backfill(database_url)

    def facets_of(data: bytes) -> list[Facet]:
        return [Facet("scores.n", float(data.decode()), None)]

    read = [await storage.backfill_facets(facets_of, 3) for _ in range(4)]
    assert read == [3, 3, 1, 0]
    page, _ = await storage.list_runs(low, 0, 10)
    assert [r.id for r in page] == ["r0", "r1", "r2"]
