"""Statements on live runs: events appended in each run's sequence (the run's row locked), and the
run written whole when it finishes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from agentrun_server._errors import NotFound
from agentrun_server.storage._rules import (
    ABANDONED_TO_ENTER,
    NOTHING_TO_ENTER,
    enters_at_finish,
    first_event_refusal,
    fold_abandoned,
    folded,
    live_run_counts_statement,
    next_event_refusal,
    stored_digest,
)
from agentrun_server.storage._types import EventOutcome, EventStatus, Fold, NewEvent, StoredRun
from agentrun_server.storage.postgres._engine import NOW, Connection
from agentrun_server.storage.postgres._runs import WorkflowCache, notify_ready


async def append_events(
    conn: Connection,
    workflows: WorkflowCache,
    events: Sequence[NewEvent],
    fold: Fold,
    max_run_bytes: int,
    now: float | None,
) -> list[EventOutcome]:
    """See `Storage.append_events`; tells the replicas' watchers which runs got events."""
    outcomes = [await _append(conn, workflows, e, fold, max_run_bytes, now) for e in events]
    landed = list(
        dict.fromkeys(
            e.run_id
            for e, o in zip(events, outcomes, strict=True)
            if o.status is EventStatus.STORED
        )
    )
    if landed:
        payload = "\n".join(landed)
        # NOTIFY's payload holds under 8,000 bytes: past it, wake every watcher.
        await conn.execute(
            "SELECT pg_notify('agentrun_events', %s)",
            (payload if len(payload.encode()) < 7_900 else "*",),
        )
    return outcomes


async def _append(
    conn: Connection,
    workflows: WorkflowCache,
    event: NewEvent,
    fold: Fold,
    max_run_bytes: int,
    now: float | None,
) -> EventOutcome:
    row = await _locked_run(conn, event.run_id)
    if row is None:
        opened = await _open(conn, workflows, event, fold, max_run_bytes, now)
        if opened is not None:
            return opened
        row = await _locked_run(conn, event.run_id)  # another replica created it meanwhile
        assert row is not None
    collection_id, state, expected, size = row
    stored = None
    if 0 < event.sequence < expected:
        stored = await _stored(conn, event, state, expected)
    refusal = next_event_refusal(event, collection_id, state, expected, size, max_run_bytes, stored)
    if refusal is not None:
        return refusal
    size += len(event.patch)
    finished: tuple[bytes, str | None] | None = None
    if event.finish:
        made = folded(fold, event, await _parts(conn, event.run_id), expected)
        if isinstance(made, EventOutcome):
            return made
        finished = made
    await conn.execute(
        f"UPDATE agent_runs SET next_sequence = %(next)s, size_bytes = %(size)s, updated_at = {NOW}, "
        "state = 'running' WHERE id = %(id)s",
        {"next": expected + 1, "size": size, "id": event.run_id, "now": now},
    )
    await _insert_event(conn, event, now)
    if finished is not None:
        await _finish(conn, workflows, event.run_id, collection_id, finished, now)
    return EventOutcome(EventStatus.STORED, expected + 1)


async def _locked_run(conn: Connection, run_id: str) -> tuple[Any, ...] | None:
    """The run's collection, state, next sequence and size, its row locked to the transaction."""
    cursor = await conn.execute(
        "SELECT collection_id, state, next_sequence, size_bytes FROM agent_runs WHERE id = %s "
        "FOR UPDATE",
        (run_id,),
    )
    return await cursor.fetchone()


async def _open(
    conn: Connection,
    workflows: WorkflowCache,
    event: NewEvent,
    fold: Fold,
    max_run_bytes: int,
    now: float | None,
) -> EventOutcome | None:
    """Create the run with its first event; None when another replica created it first."""
    refusal = first_event_refusal(event, max_run_bytes)
    if refusal is not None:
        return refusal
    cursor = await conn.execute("SELECT 1 FROM collections WHERE id = %s", (event.collection_id,))
    if await cursor.fetchone() is None:
        return EventOutcome(
            EventStatus.REFUSED, 0, NotFound(f"no collection with id {event.collection_id!r}")
        )
    finished: tuple[bytes, str | None] | None = None
    if event.finish:
        made = folded(fold, event, [], 0)
        if isinstance(made, EventOutcome):
            return made
        finished = made
    cursor = await conn.execute(
        "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data, state, "
        f"next_sequence, updated_at) VALUES (%(id)s, %(collection)s, NULL, %(size)s, {NOW}, "
        f"'', 'running', 2, {NOW}) ON CONFLICT (id) DO NOTHING RETURNING id",
        {
            "id": event.run_id,
            "collection": event.collection_id,
            "size": len(event.patch),
            "now": now,
        },
    )
    if await cursor.fetchone() is None:
        return None
    await conn.execute(
        "UPDATE collections SET run_count = run_count + 1 WHERE id = %s", (event.collection_id,)
    )
    await _insert_event(conn, event, now)
    if finished is not None:
        await _finish(conn, workflows, event.run_id, event.collection_id, finished, now)
    return EventOutcome(EventStatus.STORED, 2)


async def _stored(conn: Connection, event: NewEvent, state: str, expected: int) -> bytes | None:
    """The digest of the event stored under `event`'s sequence number (None: none is)."""
    cursor = await conn.execute(
        "SELECT digest, data FROM agent_run_events WHERE agent_run_id = %s AND sequence = %s",
        (event.run_id, event.sequence),
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    finishes = state == "finished" and event.sequence == expected - 1
    return stored_digest(row[0], row[1], finishes)


async def _parts(conn: Connection, run_id: str) -> list[bytes]:
    """The patches of a run's stored events, in order."""
    cursor = await conn.execute(
        "SELECT data FROM agent_run_events WHERE agent_run_id = %s ORDER BY sequence", (run_id,)
    )
    return [bytes(r[0]) for r in await cursor.fetchall()]


async def _insert_event(conn: Connection, event: NewEvent, now: float | None) -> None:
    await conn.execute(
        "INSERT INTO agent_run_events (agent_run_id, sequence, created_at, data, digest) "
        f"VALUES (%(id)s, %(sequence)s, {NOW}, %(data)s, %(digest)s)",
        {
            "id": event.run_id,
            "sequence": event.sequence,
            "data": event.patch,
            "digest": event.digest or None,
            "now": now,
        },
    )


async def _finish(
    conn: Connection,
    workflows: WorkflowCache,
    run_id: str,
    collection_id: str,
    finished: tuple[bytes, str | None],
    now: float | None,
) -> None:
    data, name = finished
    cursor = await conn.execute("SELECT entered_at FROM agent_runs WHERE id = %s", (run_id,))
    row = await cursor.fetchone()  # the row is locked by this transaction
    enters = enters_at_finish(row[0] if row else None)
    await conn.execute(
        f"UPDATE agent_runs SET state = 'finished', data = %(data)s, name = %(name)s, "
        f"size_bytes = %(size)s, updated_at = {NOW}, "
        f"entered_at = CASE WHEN %(enters)s THEN {NOW} ELSE entered_at END WHERE id = %(id)s",
        {
            "data": data,
            "name": name,
            "size": len(data),
            "id": run_id,
            "now": now,
            "enters": enters,
        },
    )
    if enters:
        await _enter(conn, workflows, run_id, collection_id, now)


async def _enter(
    conn: Connection,
    workflows: WorkflowCache,
    run_id: str,
    collection_id: str,
    now: float | None,
) -> None:
    """Enter the run into its collection's workflow, at the first stage (if bound to one)."""
    cursor = await conn.execute("SELECT workflow FROM collections WHERE id = %s", (collection_id,))
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return
    stage = (await workflows.get(conn, row[0])).first_stage
    await conn.execute(
        "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, max_attempts, "
        f"created_at, ready_at) VALUES (%(workflow)s, %(stage)s, %(id)s, %(collection)s, "
        f"'ready', %(max)s, {NOW}, {NOW}) ON CONFLICT DO NOTHING",
        {
            "workflow": row[0],
            "stage": stage.name,
            "id": run_id,
            "collection": collection_id,
            "max": stage.max_attempts,
            "now": now,
        },
    )
    await notify_ready(conn, row[0])


async def enter_abandoned(
    conn: Connection,
    workflows: WorkflowCache,
    abandoned_before: float,
    fold: Fold,
    limit: int,
    now: float | None,
) -> list[str]:
    """See `Storage.enter_abandoned`. Rows another replica's sweep holds are skipped."""
    cursor = await conn.execute(
        ABANDONED_TO_ENTER.format(mark="%s") + " FOR UPDATE OF r SKIP LOCKED",
        (abandoned_before, limit),
    )
    entered: list[str] = []
    for run_id, collection_id in await cursor.fetchall():
        made = fold_abandoned(fold, run_id, await _parts(conn, run_id))
        if made is None:
            await conn.execute(
                "UPDATE agent_runs SET entered_at = %s WHERE id = %s", (NOTHING_TO_ENTER, run_id)
            )
            continue
        data, name = made
        await conn.execute(
            f"UPDATE agent_runs SET data = %(data)s, name = %(name)s, entered_at = {NOW} "
            "WHERE id = %(id)s",
            {"data": data, "name": name, "id": run_id, "now": now},
        )
        await _enter(conn, workflows, run_id, collection_id, now)
        entered.append(run_id)
    return entered


async def with_parts(conn: Connection, run: StoredRun) -> StoredRun:
    """`run` with the patches of its events, if it is a live run that has not finished."""
    if run.state == "finished":
        return run
    return dataclasses.replace(run, parts=tuple(await _parts(conn, run.id)))


async def events_after(
    conn: Connection, run_id: str, after_sequence: int, limit: int
) -> tuple[StoredRun, list[tuple[int, bytes]]]:
    """See `Storage.events_after`."""
    cursor = await conn.execute(
        "SELECT id, collection_id, ingested_at, ''::bytea, seq, state, updated_at, next_sequence "
        "FROM agent_runs WHERE id = %s",
        (run_id,),
    )
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"no agent run with id {run_id!r}")
    cursor = await conn.execute(
        "SELECT sequence, data FROM agent_run_events WHERE agent_run_id = %s AND sequence > %s "
        "ORDER BY sequence LIMIT %s",
        (run_id, after_sequence, limit),
    )
    events = [(int(s), bytes(d)) for s, d in await cursor.fetchall()]
    return StoredRun(*row), events


async def count_live_runs(conn: Connection, abandoned_before: float) -> tuple[int, int]:
    """See `Storage.count_live_runs`."""
    cursor = await conn.execute(
        live_run_counts_statement("%s"), (abandoned_before, abandoned_before)
    )
    row = await cursor.fetchone()
    assert row is not None  # an aggregate has a row
    return int(row[0]), int(row[1])
