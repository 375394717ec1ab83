"""Collections and runs."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence

from agentrun_server._errors import FailedPrecondition, NotFound, Unavailable
from agentrun_server.storage._procedures.reads import sized_page
from agentrun_server.storage._procedures.workflows import WorkflowCache
from agentrun_server.storage._statements import Statements
from agentrun_server.storage._types import (
    Collection,
    CollectionPut,
    Facet,
    InsertOutcome,
    InsertStatus,
    NewRun,
    Page,
    RunQuery,
    RunSize,
    StoredRun,
)


async def create_collection(
    db: Statements,
    workflows: WorkflowCache,
    name: str,
    description: str,
    workflow: str,
    now: float,
    enter_on_abandon: bool = False,
    retention_days: int = 0,
) -> CollectionPut:
    """See `Storage.create_collection`."""
    if workflow:
        await workflows.get(db, workflow)
    collection_id = str(uuid.uuid4())
    created_at = await db.insert_collection(
        collection_id, name, description, workflow, enter_on_abandon, now
    )
    if created_at is not None:
        if retention_days:
            await db.update_collection(collection_id, None, retention_days)
        made = Collection(
            collection_id,
            name,
            description,
            workflow,
            created_at,
            0,
            enter_on_abandon,
            retention_days,
        )
        return CollectionPut(made, True)
    existing = await db.collection("name", name)
    if existing is None:  # deleted since the insert found the name taken (PostgreSQL)
        raise Unavailable(f"collection {name!r} was being deleted; create it again")
    if workflow and existing.workflow != workflow:
        bound = repr(existing.workflow) if existing.workflow else "no workflow"
        raise FailedPrecondition(f"collection {name!r} exists bound to {bound}, not {workflow!r}")
    return CollectionPut(existing, False)


async def get_collection(db: Statements, id: str, name: str) -> Collection:
    """See `Storage.get_collection`."""
    column, key = ("id", id) if id else ("name", name)
    found = await db.collection(column, key)
    if found is None:
        raise NotFound(f"no collection with {column} {key!r}")
    return found


async def list_collections(db: Statements) -> list[Collection]:
    """See `Storage.list_collections`."""
    return await db.collections()


async def insert_runs(
    db: Statements,
    workflows: WorkflowCache,
    collection_id: str,
    runs: Sequence[NewRun],
    now: float,
) -> list[InsertOutcome]:
    """See `Storage.insert_runs`. The first of each id is inserted unless stored already; a
    repeat within the batch is a duplicate."""
    bound = await db.collection_workflow(collection_id)
    if bound is None:
        raise NotFound(f"no collection with id {collection_id!r}")
    workflow = await workflows.get(db, bound) if bound else None
    first: dict[str, NewRun] = {}
    for run in runs:
        first.setdefault(run.id, run)
    unique = list(first.values())
    accepted = await db.insert_runs(collection_id, unique, now)
    refused = [run.id for run in unique if run.id not in accepted]
    owners = await db.run_collections(refused) if refused else {}
    outcomes = []
    seen: set[str] = set()
    for run in runs:
        if run.id in accepted and run.id not in seen:
            outcomes.append(InsertOutcome(InsertStatus.ACCEPTED))
        elif run.id in accepted or owners.get(run.id) == collection_id:
            outcomes.append(InsertOutcome(InsertStatus.DUPLICATE))
        else:
            outcomes.append(InsertOutcome(InsertStatus.CONFLICT, owners.get(run.id)))
        seen.add(run.id)
    facets = [(accepted[run.id], f) for run in unique if run.id in accepted for f in run.facets]
    if facets:
        await db.insert_facets(collection_id, facets)
    if workflow is not None and accepted:
        entering = [(run.id, collection_id) for run in unique if run.id in accepted]
        await db.enter_tasks(workflow.name, workflow.first_stage, entering, 0, now)
        await db.notify_ready(workflow.name)
    if accepted:  # last: it locks the collection's row until the commit that follows
        await db.add_run_count(collection_id, len(accepted))
    return outcomes


async def with_parts(db: Statements, run: StoredRun) -> StoredRun:
    """`run` with the patches of its events, if it is a live run that has not finished."""
    if run.state == "finished":
        return run
    return dataclasses.replace(run, parts=tuple(await db.event_patches(run.id)))


async def get_run(db: Statements, run_id: str) -> StoredRun:
    """See `Storage.get_run`."""
    run = await db.run(run_id)
    if run is None:
        raise NotFound(f"no agent run with id {run_id!r}")
    return await with_parts(db, run)


async def run_size(db: Statements, run_id: str) -> RunSize:
    """See `Storage.run_size`."""
    found = await db.run_size(run_id)
    if found is None:
        raise NotFound(f"no agent run with id {run_id!r}")
    return RunSize(*found)


async def list_runs(
    db: Statements, query: RunQuery, after_seq: int, limit: int, max_bytes: int | None
) -> Page[StoredRun]:
    """See `Storage.list_runs`. Sizes are read first, so only the runs returned are read whole
    (`reads.sized_page`)."""
    runs, more = await sized_page(
        lambda after: db.run_sizes(query, after, limit + 1),
        lambda after, last: db.runs_through(query, after, last),
        after_seq,
        limit,
        max_bytes,
    )
    return Page([await with_parts(db, run) for run in runs], more)


async def backfill_facets(
    db: Statements, facets_of: Callable[[bytes], Sequence[Facet]], limit: int
) -> int:
    """See `Storage.backfill_facets`."""
    done, through = await db.facet_backfill()
    if done >= through:
        return 0
    runs = await db.runs_between(done, through, limit)
    by_collection: dict[str, list[tuple[int, Facet]]] = {}
    for run in runs:
        if run.state == "finished":  # a live run gets its facets when it finishes
            rows = by_collection.setdefault(run.collection_id, [])
            rows += [(run.seq, facet) for facet in facets_of(run.data)]
    for collection_id, rows in by_collection.items():
        await db.insert_facets(collection_id, rows)
    last = runs[-1].seq if runs else through
    if not await db.advance_facet_backfill(done, last if len(runs) == limit else through):
        return 0  # another replica did these meanwhile (its facets and ours are the same)
    return len(runs)


async def run_collections(db: Statements, run_ids: Sequence[str]) -> dict[str, str]:
    """See `Storage.run_collections`."""
    return await db.run_collections(list(set(run_ids)))


async def count_runs(db: Statements, collection_id: str) -> int:
    """See `Storage.count_runs`."""
    return await db.run_count(collection_id)
