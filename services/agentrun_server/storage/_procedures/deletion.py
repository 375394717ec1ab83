"""Deleting runs and collections: by request, and by each collection's retention.

A run goes with everything of it (events, facets, its tasks in every workflow and their failed
attempts) in one transaction, a batch of runs at a time; a collection goes once it holds no run.
A leased task stands in the way unless the deletion is forced, which cancels the task first
(revoking its lease, as a cancel does) so that its worker hears of it. The retention sweep runs in
every replica at once: the runs it deletes are locked as they are chosen, skipping those another
holds, and it passes over runs with a leased task (a later sweep takes them).
"""

from __future__ import annotations

from collections.abc import Sequence

from agentrun_server._errors import FailedPrecondition, NotFound
from agentrun_server.storage._procedures.leases import cancel_selected
from agentrun_server.storage._rules import leased_message
from agentrun_server.storage._statements import Statements, TaskSelection
from agentrun_server.storage._types import (
    Collection,
    Deleted,
    DoomedRun,
    LeasedTaskOfRun,
    RunSelection,
)

SECONDS_PER_DAY = 86_400.0


async def update_collection(
    db: Statements, collection_id: str, description: str | None, retention_days: int | None
) -> Collection:
    """See `Storage.update_collection`."""
    if not await db.update_collection(collection_id, description, retention_days):
        raise NotFound(f"no collection with id {collection_id!r}")
    found = await db.collection("id", collection_id)
    assert found is not None  # changed in this transaction
    return found


async def leased_tasks(db: Statements, selection: RunSelection) -> list[LeasedTaskOfRun]:
    """See `Storage.leased_tasks`."""
    return await db.leased_tasks(selection)


async def delete_runs(
    db: Statements, selection: RunSelection, force: bool, limit: int, now: float
) -> Deleted:
    """See `Storage.delete_runs`."""
    chosen = await db.runs_to_delete(selection, limit, skip_leased=False)
    if not chosen:
        return Deleted([], 0, [], False)
    deleted = await _delete(db, chosen, force, now)
    return deleted._replace(more=len(chosen) == limit)


async def _delete(db: Statements, chosen: Sequence[DoomedRun], force: bool, now: float) -> Deleted:
    ids = [run.id for run in chosen]
    leased = await db.leased_tasks(RunSelection(run_ids=ids))
    revoked = []
    if leased:
        if not force:
            raise FailedPrecondition(leased_message(leased, len({t.run_id for t in leased})))
        selection = TaskSelection([t.task_id for t in leased], "", ())
        revoked = (await cancel_selected(db, selection, now)).ended
    tasks = await db.delete_runs(chosen)
    return Deleted(ids, tasks, revoked, False)


async def delete_collection(
    db: Statements, collection_id: str, force: bool, limit: int, now: float
) -> Deleted:
    """See `Storage.delete_collection`."""
    if await db.collection("id", collection_id) is None:
        raise NotFound(f"no collection with id {collection_id!r}")
    deleted = await delete_runs(db, RunSelection(collection_id=collection_id), force, limit, now)
    if deleted.more:
        return deleted
    # Runs stored meanwhile (or, on PostgreSQL, held by another deleter) keep it: more to do.
    return deleted._replace(more=not await db.delete_collection(collection_id))


async def delete_expired(db: Statements, now: float, limit: int) -> list[DoomedRun]:
    """See `Storage.delete_expired`."""
    deleted: list[DoomedRun] = []
    for collection_id, days in await db.retained_collections():
        before = now - days * SECONDS_PER_DAY
        selection = RunSelection(collection_id=collection_id, ingested_before=before)
        chosen = await db.runs_to_delete(selection, limit - len(deleted), skip_leased=True)
        if chosen:  # forced: a task leased since it was chosen is cancelled, its worker told
            await _delete(db, chosen, True, now)
            deleted += chosen
        if len(deleted) >= limit:
            break
    return deleted
