"""Reads of tasks: one task with its failed attempts, and pages of tasks."""

from __future__ import annotations

import sqlite3
from typing import Any

from agentrun_server._errors import NotFound
from agentrun_server.storage._rules import take_within
from agentrun_server.storage._types import AttemptFailureRecord, TaskRecord, TaskState

_TASK_COLUMNS = (
    "id, workflow, stage, agent_run_id, collection_id, state, attempt, max_attempts, priority, "
    "created_at, ready_at, lease_deadline, pathway, output, input, previous_task_id"
)


def _task(db: sqlite3.Connection, row: tuple[Any, ...]) -> TaskRecord:
    failures = tuple(
        AttemptFailureRecord(*r)
        for r in db.execute(
            "SELECT attempt, error, failed_at FROM task_failures WHERE task_id = ? ORDER BY attempt",
            (row[0],),
        )
    )
    fields = [*row[:5], TaskState(row[5]), *row[6:], failures]
    return TaskRecord(*fields)


def get_task(db: sqlite3.Connection, task_id: int) -> TaskRecord:
    """See `Storage.get_task`."""
    row = db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise NotFound(f"no task with id {task_id}")
    return _task(db, row)


def list_tasks(
    db: sqlite3.Connection,
    workflow: str,
    stage: str,
    state: TaskState | None,
    after_id: int,
    limit: int,
    max_bytes: int | None,
) -> tuple[list[TaskRecord], bool]:
    """See `Storage.list_tasks`. Sizes are read first, so only the tasks returned are read whole."""
    where, args = ["id > ?"], [after_id]
    for column, value in (("workflow", workflow), ("stage", stage)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)  # type: ignore[arg-type]
    if state is not None:
        where.append("state = ?")
        args.append(state.value)  # type: ignore[arg-type]
    condition = " AND ".join(where)
    sizes = db.execute(
        "SELECT id, coalesce(length(input), 0) + coalesce(length(output), 0) FROM tasks "
        f"WHERE {condition} ORDER BY id LIMIT ?",
        (*args, limit + 1),
    ).fetchall()
    kept, more = take_within([size for _, size in sizes], limit, max_bytes)
    if not kept:
        return [], False
    rows = db.execute(
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE {condition} AND id <= ? ORDER BY id",
        (*args, sizes[kept - 1][0]),
    ).fetchall()
    return [_task(db, r) for r in rows], more
