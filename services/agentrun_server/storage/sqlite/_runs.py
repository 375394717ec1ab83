"""Statements on collections and runs. Each function takes the connection it runs on."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from agentrun_server._errors import FailedPrecondition, NotFound
from agentrun_server.storage._rules import run_state_clause, take_within
from agentrun_server.storage._types import (
    Collection,
    InsertOutcome,
    InsertStatus,
    NewRun,
    StoredRun,
)
from agentrun_server.storage.sqlite._engine import select_in, transaction
from agentrun_server.storage.sqlite._live import with_parts
from agentrun_server.storage.sqlite._workflows import WorkflowCache

_COLLECTION_COLUMNS = "id, name, description, workflow, created_at, run_count, enter_on_abandon"
_RUN_COLUMNS = "id, collection_id, ingested_at, data, seq, state, updated_at, next_sequence"
_INSERT_ROWS = 100
_INSERT_BYTES = 4 * 1024 * 1024
"""A multi-row INSERT holds at most this many bytes of runs (and at least one run): SQLite copies
every value it binds, so 1,000 rows of large runs held one statement's worth more memory at once
(the server's peak RSS rose by half)."""


def _collection(row: tuple[Any, ...]) -> Collection:
    id, name, description, workflow, created_at, run_count, enter_on_abandon = row
    return Collection(
        id, name, description, workflow, created_at, run_count, bool(enter_on_abandon)
    )


def create_collection(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    name: str,
    description: str,
    workflow: str,
    now: float,
    enter_on_abandon: bool = False,
) -> tuple[Collection, bool]:
    """See `Storage.create_collection`."""
    with transaction(db):
        if workflow:
            workflows.get(db, workflow)
        collection_id = str(uuid.uuid4())
        created = db.execute(
            "INSERT INTO collections (id, name, description, workflow, created_at, "
            "enter_on_abandon) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING RETURNING id",
            (collection_id, name, description, workflow, now, enter_on_abandon),
        ).fetchone()
        if created is not None:
            made = Collection(collection_id, name, description, workflow, now, 0, enter_on_abandon)
            return made, True
        existing = _collection(
            db.execute(
                f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE name = ?", (name,)
            ).fetchone()
        )
        if workflow and existing.workflow != workflow:
            bound = repr(existing.workflow) if existing.workflow else "no workflow"
            raise FailedPrecondition(
                f"collection {name!r} exists bound to {bound}, not {workflow!r}"
            )
        return existing, False


def get_collection(db: sqlite3.Connection, id: str, name: str) -> Collection:
    """See `Storage.get_collection`."""
    column, key = ("id", id) if id else ("name", name)
    row = db.execute(
        f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE {column} = ?", (key,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no collection with {column} {key!r}")
    return _collection(row)


def list_collections(db: sqlite3.Connection) -> list[Collection]:
    """See `Storage.list_collections`."""
    rows = db.execute(
        f"SELECT {_COLLECTION_COLUMNS} FROM collections ORDER BY created_at, id"
    ).fetchall()
    return [_collection(row) for row in rows]


def insert_runs(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    collection_id: str,
    runs: Sequence[NewRun],
    now: float,
) -> list[InsertOutcome]:
    """See `Storage.insert_runs`."""
    with transaction(db):
        row = db.execute(
            "SELECT workflow FROM collections WHERE id = ?", (collection_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no collection with id {collection_id!r}")
        workflow = workflows.get(db, row[0]) if row[0] else None
        # The first of each id is inserted unless stored already (ON CONFLICT DO NOTHING);
        # a repeat within the batch is a duplicate.
        first: dict[str, NewRun] = {}
        for run in runs:
            first.setdefault(run.id, run)
        unique = list(first.values())
        accepted: set[str] = set()
        for batch in _statements(unique):
            values: list[Any] = []
            for run in batch:
                values += (run.id, collection_id, run.name, len(run.data), now, run.data)
            accepted.update(
                r[0]
                for r in db.execute(
                    "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, "
                    "data) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(batch))
                    + " ON CONFLICT (id) DO NOTHING RETURNING id",
                    values,
                )
            )
        refused = [run.id for run in unique if run.id not in accepted]
        owners: dict[str, str] = dict(
            select_in(db, "SELECT id, collection_id FROM agent_runs WHERE id IN ({ids})", refused)
        )
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
        if accepted:
            db.execute(
                "UPDATE collections SET run_count = run_count + ? WHERE id = ?",
                (len(accepted), collection_id),
            )
        if workflow is not None and accepted:
            stage = workflow.first_stage
            db.executemany(
                "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
                "max_attempts, created_at, ready_at) VALUES (?, ?, ?, ?, 'ready', ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [
                    (workflow.name, stage.name, run.id, collection_id, stage.max_attempts, now, now)
                    for run in unique
                    if run.id in accepted
                ],
            )
        return outcomes


def _statements(runs: list[NewRun]) -> Iterator[list[NewRun]]:
    """`runs` in slices for one INSERT each: at most _INSERT_ROWS runs and _INSERT_BYTES."""
    batch: list[NewRun] = []
    size = 0
    for run in runs:
        if batch and (len(batch) == _INSERT_ROWS or size + len(run.data) > _INSERT_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(run)
        size += len(run.data)
    if batch:
        yield batch


def get_run(db: sqlite3.Connection, run_id: str) -> StoredRun:
    """See `Storage.get_run`."""
    row = db.execute(f"SELECT {_RUN_COLUMNS} FROM agent_runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFound(f"no agent run with id {run_id!r}")
    return with_parts(db, StoredRun(*row))


def list_runs(
    db: sqlite3.Connection,
    collection_id: str,
    after_seq: int,
    limit: int,
    max_bytes: int | None,
    state: str | None = None,
    abandoned_before: float = 0.0,
) -> tuple[list[StoredRun], bool]:
    """See `Storage.list_runs`. Sizes are read first, so only the runs returned are read whole."""
    where, params = run_state_clause(state, abandoned_before, "?")
    sizes = db.execute(
        f"SELECT seq, size_bytes FROM agent_runs WHERE collection_id = ? AND seq > ?{where} "
        "ORDER BY seq LIMIT ?",
        (collection_id, after_seq, *params, limit + 1),
    ).fetchall()
    kept, more = take_within([size for _, size in sizes], limit, max_bytes)
    if not kept:
        return [], False
    rows = db.execute(
        f"SELECT {_RUN_COLUMNS} FROM agent_runs "
        f"WHERE collection_id = ? AND seq > ? AND seq <= ?{where} ORDER BY seq",
        (collection_id, after_seq, sizes[kept - 1][0], *params),
    ).fetchall()
    return [with_parts(db, StoredRun(*r)) for r in rows], more


def run_collections(db: sqlite3.Connection, run_ids: Sequence[str]) -> dict[str, str]:
    """See `Storage.run_collections`."""
    return dict(
        select_in(
            db, "SELECT id, collection_id FROM agent_runs WHERE id IN ({ids})", list(set(run_ids))
        )
    )


def count_runs(db: sqlite3.Connection, collection_id: str) -> int:
    """See `Storage.count_runs`."""
    row = db.execute("SELECT run_count FROM collections WHERE id = ?", (collection_id,)).fetchone()
    return int(row[0]) if row else 0
