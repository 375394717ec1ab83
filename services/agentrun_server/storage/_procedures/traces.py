"""OpenTelemetry traces as live runs: each batch of a trace's new spans appended to its run as
one event, numbered by the server; the run finished, rebuilt from every span in start order,
once its root span has ended and no span has come for a quiet period.

A trace's row is locked while a batch is applied (PostgreSQL), so batches of one trace through
several replicas take turns; spans are kept once by id, so an exporter's retry stores nothing
twice. A trace's run is in the collection its first batch named; later batches join it whatever they
name (the processes of one trace may call themselves differently). A batch the run refuses (it
finished, it grew past its limit, its id is a run uploaded whole) stores nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from agentrun_server._errors import AlreadyExists
from agentrun_server.storage._procedures.live import append_event
from agentrun_server.storage._procedures.runs import create_collection
from agentrun_server.storage._procedures.workflows import WorkflowCache
from agentrun_server.storage._rules import event_digest
from agentrun_server.storage._statements import Statements
from agentrun_server.storage._types import (
    EventStatus,
    Fold,
    Folded,
    NewEvent,
    Project,
    Rebuild,
    SpansOutcome,
    TraceBatch,
)


async def append_spans(
    db: Statements,
    workflows: WorkflowCache,
    batches: Sequence[TraceBatch],
    project: Project,
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> list[SpansOutcome]:
    """See `Storage.append_spans`. Traces are taken in run id order, so that replicas applying
    exports of the same traces lock them in one order."""
    outcomes: dict[str, SpansOutcome] = {}
    made: dict[str, str] = {}

    async def collection_id(name: str) -> str:
        """The collection named, made on first use: only a trace's first batch asks."""
        if name not in made:
            made[name] = (await create_collection(db, workflows, name, "", "", now)).collection.id
        return made[name]

    for batch in sorted(batches, key=lambda b: b.run_id):
        outcomes[batch.run_id] = await _append_trace(
            db, workflows, batch, collection_id, project, fold, max_run_bytes, now
        )
    stored = [run_id for run_id, outcome in outcomes.items() if outcome.stored]
    if stored:
        await db.notify_events(stored)
    return [outcomes[batch.run_id] for batch in batches]


async def _append_trace(
    db: Statements,
    workflows: WorkflowCache,
    batch: TraceBatch,
    collection_id: Callable[[str], Awaitable[str]],
    project: Project,
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> SpansOutcome:
    run_id, collection, spans = batch
    trace = await db.trace(run_id)
    if trace is None:
        await db.open_trace(run_id, now)
        trace = await db.trace(run_id)
        assert trace is not None
    unique = list({span.span_id: span for span in spans}.values())
    known = await db.stored_spans(run_id, [span.span_id for span in unique])
    new = sorted((s for s in unique if s.span_id not in known), key=lambda s: s.start_ns)
    duplicates = len(spans) - len(new)
    if not new:
        return SpansOutcome(0, duplicates)
    run = await db.live_run(run_id)
    if run is not None and run.next_sequence == 0:
        return SpansOutcome(
            0, duplicates, AlreadyExists(f"run {run_id!r} was uploaded whole, not traced")
        )
    patch, state = project(trace.state, [span.data for span in new])
    if run is None:
        sequence, into = 1, await collection_id(collection)
    else:  # a trace's later spans join its run, whatever process sent them
        sequence, into = run.next_sequence, run.collection_id
    event = NewEvent(run_id, sequence, into, patch, False, event_digest(patch, False))
    outcome = await append_event(db, workflows, event, fold, max_run_bytes, now)
    if outcome.status is not EventStatus.STORED:
        return SpansOutcome(0, duplicates, outcome.error)
    await db.insert_spans(run_id, new)
    await db.update_trace(run_id, state, any(span.root for span in new), now)
    return SpansOutcome(len(new), duplicates, None, run is None)


async def finish_quiet_traces(
    db: Statements,
    workflows: WorkflowCache,
    quiet_before: float,
    rebuild: Rebuild,
    max_run_bytes: int,
    limit: int,
    now: float,
) -> list[str]:
    """See `Storage.finish_quiet_traces`."""
    finished = []
    for run_id in await db.traces_to_finish(quiet_before, limit):
        run = await db.live_run(run_id)
        if run is None or run.state == "finished":
            await db.finish_trace(run_id)  # deleted, or finished some other way
            continue
        spans = await db.trace_spans(run_id)

        def whole(run_id: str, parts: Sequence[bytes], spans: list[bytes] = spans) -> Folded:
            return rebuild(run_id, spans)  # the events' patches are in arrival order

        digest = event_digest(b"", True)
        event = NewEvent(run_id, run.next_sequence, run.collection_id, b"", True, digest)
        outcome = await append_event(db, workflows, event, whole, max_run_bytes, now)
        await db.finish_trace(run_id)
        if outcome.status is EventStatus.STORED:
            finished.append(run_id)
    if finished:
        await db.notify_events(finished)
    return finished
