"""Statements on live runs: events appended in each run's sequence, and the run written whole when
it finishes."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence

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
from agentrun_server.storage.sqlite._engine import transaction
from agentrun_server.storage.sqlite._workflows import WorkflowCache


def append_events(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    events: Sequence[NewEvent],
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> list[EventOutcome]:
    """See `Storage.append_events`."""
    with transaction(db):
        return [_append(db, workflows, e, fold, max_run_bytes, now) for e in events]


def _append(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    event: NewEvent,
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> EventOutcome:
    row = db.execute(
        "SELECT collection_id, state, next_sequence, size_bytes FROM agent_runs WHERE id = ?",
        (event.run_id,),
    ).fetchone()
    if row is None:
        return _open(db, workflows, event, fold, max_run_bytes, now)
    collection_id, state, expected, size = row
    stored = _stored(db, event, state, expected) if 0 < event.sequence < expected else None
    refusal = next_event_refusal(event, collection_id, state, expected, size, max_run_bytes, stored)
    if refusal is not None:
        return refusal
    size += len(event.patch)
    finished: tuple[bytes, str | None] | None = None
    if event.finish:
        made = folded(fold, event, _parts(db, event.run_id), expected)
        if isinstance(made, EventOutcome):
            return made
        finished = made
    db.execute(
        "UPDATE agent_runs SET next_sequence = ?, size_bytes = ?, updated_at = ?, "
        "state = 'running' WHERE id = ? AND next_sequence = ?",
        (expected + 1, size, now, event.run_id, expected),
    )
    _insert_event(db, event, now)
    if finished is not None:
        _finish(db, workflows, event.run_id, collection_id, finished, now)
    return EventOutcome(EventStatus.STORED, expected + 1)


def _open(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    event: NewEvent,
    fold: Fold,
    max_run_bytes: int,
    now: float,
) -> EventOutcome:
    refusal = first_event_refusal(event, max_run_bytes)
    if refusal is not None:
        return refusal
    if (
        db.execute("SELECT 1 FROM collections WHERE id = ?", (event.collection_id,)).fetchone()
        is None
    ):
        return EventOutcome(
            EventStatus.REFUSED, 0, NotFound(f"no collection with id {event.collection_id!r}")
        )
    finished: tuple[bytes, str | None] | None = None
    if event.finish:
        made = folded(fold, event, [], 0)
        if isinstance(made, EventOutcome):
            return made
        finished = made
    db.execute(
        "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data, state, "
        "next_sequence, updated_at) VALUES (?, ?, NULL, ?, ?, x'', 'running', 2, ?)",
        (event.run_id, event.collection_id, len(event.patch), now, now),
    )
    db.execute(
        "UPDATE collections SET run_count = run_count + 1 WHERE id = ?", (event.collection_id,)
    )
    _insert_event(db, event, now)
    if finished is not None:
        _finish(db, workflows, event.run_id, event.collection_id, finished, now)
    return EventOutcome(EventStatus.STORED, 2)


def _stored(db: sqlite3.Connection, event: NewEvent, state: str, expected: int) -> bytes | None:
    """The digest of the event stored under `event`'s sequence number (None: none is)."""
    row = db.execute(
        "SELECT digest, data FROM agent_run_events WHERE agent_run_id = ? AND sequence = ?",
        (event.run_id, event.sequence),
    ).fetchone()
    if row is None:
        return None
    finishes = state == "finished" and event.sequence == expected - 1
    return stored_digest(row[0], row[1], finishes)


def _parts(db: sqlite3.Connection, run_id: str) -> list[bytes]:
    """The patches of a run's stored events, in order."""
    rows = db.execute(
        "SELECT data FROM agent_run_events WHERE agent_run_id = ? ORDER BY sequence", (run_id,)
    )
    return [r[0] for r in rows]


def _insert_event(db: sqlite3.Connection, event: NewEvent, now: float) -> None:
    db.execute(
        "INSERT INTO agent_run_events (agent_run_id, sequence, created_at, data, digest) "
        "VALUES (?, ?, ?, ?, ?)",
        (event.run_id, event.sequence, now, event.patch, event.digest or None),
    )


def _finish(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    run_id: str,
    collection_id: str,
    finished: tuple[bytes, str | None],
    now: float,
) -> None:
    data, name = finished
    (entered_at,) = db.execute(
        "SELECT entered_at FROM agent_runs WHERE id = ?", (run_id,)
    ).fetchone()
    enters = enters_at_finish(entered_at)
    db.execute(
        "UPDATE agent_runs SET state = 'finished', data = ?, name = ?, size_bytes = ?, "
        "updated_at = ?, entered_at = ? WHERE id = ?",
        (data, name, len(data), now, now if enters else entered_at, run_id),
    )
    if enters:
        _enter(db, workflows, run_id, collection_id, now)


def _enter(
    db: sqlite3.Connection, workflows: WorkflowCache, run_id: str, collection_id: str, now: float
) -> None:
    """Enter the run into its collection's workflow, at the first stage (if bound to one)."""
    workflow_name = db.execute(
        "SELECT workflow FROM collections WHERE id = ?", (collection_id,)
    ).fetchone()[0]
    if workflow_name:
        stage = workflows.get(db, workflow_name).first_stage
        db.execute(
            "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
            "max_attempts, created_at, ready_at) VALUES (?, ?, ?, ?, 'ready', ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (workflow_name, stage.name, run_id, collection_id, stage.max_attempts, now, now),
        )


def enter_abandoned(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    abandoned_before: float,
    fold: Fold,
    limit: int,
    now: float,
) -> list[str]:
    """See `Storage.enter_abandoned`."""
    with transaction(db):
        rows = db.execute(ABANDONED_TO_ENTER.format(mark="?"), (abandoned_before, limit)).fetchall()
        entered: list[str] = []
        for run_id, collection_id in rows:
            made = fold_abandoned(fold, run_id, _parts(db, run_id))
            if made is None:
                db.execute(
                    f"UPDATE agent_runs SET entered_at = {NOTHING_TO_ENTER} WHERE id = ?", (run_id,)
                )
                continue
            data, name = made
            db.execute(
                "UPDATE agent_runs SET data = ?, name = ?, entered_at = ? WHERE id = ?",
                (data, name, now, run_id),
            )
            _enter(db, workflows, run_id, collection_id, now)
            entered.append(run_id)
        return entered


def with_parts(db: sqlite3.Connection, run: StoredRun) -> StoredRun:
    """`run` with the patches of its events, if it is a live run that has not finished."""
    if run.state == "finished":
        return run
    return dataclasses.replace(run, parts=tuple(_parts(db, run.id)))


def events_after(
    db: sqlite3.Connection, run_id: str, after_sequence: int, limit: int
) -> tuple[StoredRun, list[tuple[int, bytes]]]:
    """See `Storage.events_after`."""
    row = db.execute(
        "SELECT id, collection_id, ingested_at, x'', seq, state, updated_at, next_sequence "
        "FROM agent_runs WHERE id = ?",
        (run_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no agent run with id {run_id!r}")
    events = db.execute(
        "SELECT sequence, data FROM agent_run_events WHERE agent_run_id = ? AND sequence > ? "
        "ORDER BY sequence LIMIT ?",
        (run_id, after_sequence, limit),
    ).fetchall()
    return StoredRun(*row), [(int(s), bytes(d)) for s, d in events]


MAX_LANDED_RUNS = 10_000
"""Runs one look at new events names at most; past it, every watcher is woken (None)."""


def events_landed_after(db: sqlite3.Connection, after_id: int) -> tuple[int, list[str] | None]:
    """The newest event's row id, and the runs whose events have row ids after `after_id` (None:
    more than MAX_LANDED_RUNS, wake every watcher); -1: just the id to start from."""
    if after_id < 0:
        row = db.execute("SELECT coalesce(max(rowid), 0) FROM agent_run_events").fetchone()
        return int(row[0]), []
    rows = db.execute(
        "SELECT agent_run_id, max(rowid) FROM agent_run_events WHERE rowid > ? "
        "GROUP BY agent_run_id LIMIT ?",
        (after_id, MAX_LANDED_RUNS + 1),
    ).fetchall()
    if not rows:
        return after_id, []
    if len(rows) > MAX_LANDED_RUNS:
        row = db.execute("SELECT coalesce(max(rowid), 0) FROM agent_run_events").fetchone()
        return int(row[0]), None
    return max(int(r[1]) for r in rows), [r[0] for r in rows]


def count_live_runs(db: sqlite3.Connection, abandoned_before: float) -> tuple[int, int]:
    """See `Storage.count_live_runs`."""
    row = db.execute(
        live_run_counts_statement("?"), (abandoned_before, abandoned_before)
    ).fetchone()
    return int(row[0]), int(row[1])
