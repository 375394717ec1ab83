"""Live runs: events appended in each run's sequence (the run's row locked), the run written
whole when it finishes, and abandoned runs entered into their workflow."""

from __future__ import annotations

from collections.abc import Sequence

from agentrun_server._errors import NotFound
from agentrun_server.storage._procedures.workflows import WorkflowCache
from agentrun_server.storage._rules import (
    enters_at_finish,
    first_event_refusal,
    fold_abandoned,
    folded,
    next_event_refusal,
    stored_digest,
    take_within,
)
from agentrun_server.storage._statements import Statements
from agentrun_server.storage._types import (
    EventOutcome,
    EventPage,
    EventStatus,
    Fold,
    Folded,
    LiveRunCounts,
    NewEvent,
)


async def append_events(
    db: Statements,
    workflows: WorkflowCache,
    events: Sequence[NewEvent],
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> list[EventOutcome]:
    """See `Storage.append_events`; tells the other processes which runs got events."""
    outcomes = [await append_event(db, workflows, e, fold, max_run_bytes, now) for e in events]
    landed = [
        e.run_id for e, o in zip(events, outcomes, strict=True) if o.status is EventStatus.STORED
    ]
    if landed:
        await db.notify_events(list(dict.fromkeys(landed)))
    return outcomes


async def append_event(
    db: Statements,
    workflows: WorkflowCache,
    event: NewEvent,
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> EventOutcome:
    """Append one event to its run (the run's row locked), as `Storage.append_events` answers
    each; a refused event writes nothing."""
    run = await db.live_run(event.run_id)
    if run is None:
        opened = await _open(db, workflows, event, fold, max_run_bytes, now)
        if opened is not None:
            return opened
        run = await db.live_run(event.run_id)  # another replica created it meanwhile
        assert run is not None
    expected = run.next_sequence
    stored = None
    if 0 < event.sequence < expected:
        found = await db.stored_event(event.run_id, event.sequence)
        if found is not None:
            finishes = run.state == "finished" and event.sequence == expected - 1
            stored = stored_digest(found[0], found[1], finishes)
    refusal = next_event_refusal(
        event, run.collection_id, run.state, expected, run.size_bytes, max_run_bytes, stored
    )
    if refusal is not None:
        return refusal
    finished: Folded | None = None
    if event.finish:
        made = folded(fold, event, await db.event_patches(event.run_id), expected)
        if isinstance(made, EventOutcome):
            return made
        finished = made
    await db.advance_live_run(event.run_id, expected, run.size_bytes + len(event.patch), now)
    await db.insert_event(event, now)
    if finished is not None:
        await _finish(db, workflows, event.run_id, run.collection_id, finished, run.entered_at, now)
    return EventOutcome(EventStatus.STORED, expected + 1)


async def _open(
    db: Statements,
    workflows: WorkflowCache,
    event: NewEvent,
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> EventOutcome | None:
    """Create the run with its first event; None when another replica created it first."""
    refusal = first_event_refusal(event, max_run_bytes)
    if refusal is not None:
        return refusal
    if await db.collection_workflow(event.collection_id) is None:
        return EventOutcome(
            EventStatus.REFUSED, 0, NotFound(f"no collection with id {event.collection_id!r}")
        )
    finished: Folded | None = None
    if event.finish:
        made = folded(fold, event, [], 0)
        if isinstance(made, EventOutcome):
            return made
        finished = made
    if not await db.open_live_run(event, now):
        return None
    await db.add_run_count(event.collection_id, 1)
    await db.insert_event(event, now)
    if finished is not None:
        await _finish(db, workflows, event.run_id, event.collection_id, finished, None, now)
    return EventOutcome(EventStatus.STORED, 2)


async def _finish(
    db: Statements,
    workflows: WorkflowCache,
    run_id: str,
    collection_id: str,
    finished: Folded,
    entered_at: float | None,
    now: float,
) -> None:
    enters = enters_at_finish(entered_at)
    await db.finish_run(run_id, finished.data, finished.name, enters, now)
    seq = await db.run_seq(run_id)
    if seq is not None and finished.facets:
        await db.insert_facets(collection_id, [(seq, facet) for facet in finished.facets])
    if enters:
        await _enter(db, workflows, run_id, collection_id, now)


async def _enter(
    db: Statements, workflows: WorkflowCache, run_id: str, collection_id: str, now: float
) -> None:
    """Enter the run into its collection's workflow, at the first stage (if bound to one)."""
    workflow = await db.collection_workflow(collection_id)
    if workflow:
        stage = (await workflows.get(db, workflow)).first_stage
        await db.enter_tasks(workflow, stage, [(run_id, collection_id)], 0, now)
        await db.notify_ready(workflow)


async def enter_abandoned(
    db: Statements,
    workflows: WorkflowCache,
    abandoned_before: float,
    fold: Fold,
    limit: int,
    now: float,
) -> list[str]:
    """See `Storage.enter_abandoned`. Runs another replica's sweep holds are skipped."""
    entered: list[str] = []
    for run_id, collection_id in await db.abandoned_to_enter(abandoned_before, limit):
        made = fold_abandoned(fold, run_id, await db.event_patches(run_id))
        if made is None:
            await db.enter_abandoned_run(run_id, None, None, now)
            continue
        await db.enter_abandoned_run(run_id, made[0], made[1], now)
        await _enter(db, workflows, run_id, collection_id, now)
        entered.append(run_id)
    return entered


async def events_after(
    db: Statements, run_id: str, after_sequence: int, limit: int, max_bytes: int | None
) -> EventPage:
    """See `Storage.events_after`. With `max_bytes`, the events' sizes are read first, so only
    the events returned are read whole."""
    run = await db.run_header(run_id)
    if run is None:
        raise NotFound(f"no agent run with id {run_id!r}")
    if max_bytes is not None:
        sizes = await db.event_sizes(run_id, after_sequence, limit)
        limit, _ = take_within(sizes, limit, max_bytes)
    return EventPage(run, await db.events_after(run_id, after_sequence, limit))


async def count_live_runs(db: Statements, abandoned_before: float) -> dict[str, LiveRunCounts]:
    """See `Storage.count_live_runs`."""
    rows = await db.live_run_counts(abandoned_before)
    return {
        collection: LiveRunCounts(running, abandoned) for collection, running, abandoned in rows
    }
