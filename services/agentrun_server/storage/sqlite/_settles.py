"""Statements that settle leases: complete, fail, extend, release.

Every state change is one guarded statement: it moves a task only while the lease presented is
the task's current one (`WHERE state = 'leased' AND lease_id = ?`) and returns what moved. What
a settle means (routing, retry or dead, repeats) is decided by `storage._rules`.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from typing import Any

from agentrun_server._errors import NotFound
from agentrun_server.storage import _rules as rules
from agentrun_server.storage._rules import SettleRow
from agentrun_server.storage._types import Ack, Completion, Extension, Failure, Release, StageDef
from agentrun_server.storage.sqlite._counts import add_counts
from agentrun_server.storage.sqlite._engine import select_in
from agentrun_server.storage.sqlite._workflows import WorkflowCache

_INSERT_ROWS = 1000  # rows per multi-row VALUES list, far under SQLite's parameter limit
_SETTLE_COLUMNS = "id, state, lease_id, workflow, stage, attempt, max_attempts, pathway"


def settle_rows(db: sqlite3.Connection, task_ids: Sequence[int]) -> dict[int, SettleRow]:
    """The tasks named, by id (absent: no such task)."""
    return {
        row[0]: SettleRow._make(row)
        for row in select_in(
            db,
            f"SELECT {_SETTLE_COLUMNS}, NULL, session_id FROM tasks WHERE id IN ({{ids}})",
            list(set(task_ids)),
        )
    }


def settle_row(db: sqlite3.Connection, task_id: int, lease_id: str) -> SettleRow | None:
    """One task, and the error of a failure on record under `lease_id` (if any)."""
    row = db.execute(
        f"SELECT {_SETTLE_COLUMNS}, (SELECT error FROM task_failures f "
        "WHERE f.task_id = tasks.id AND f.lease_id = ? LIMIT 1), session_id FROM tasks WHERE id = ?",
        (lease_id, task_id),
    ).fetchone()
    return None if row is None else SettleRow._make(row)


def stage_of(workflows: WorkflowCache, db: sqlite3.Connection, row: SettleRow) -> StageDef:
    """The task's stage policy (defaults if a newer definition dropped the stage)."""
    try:
        return workflows.get(db, row.workflow).stage(row.stage)
    except NotFound:
        return StageDef(row.stage)


def complete(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    items: Sequence[Completion],
    now: float,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.complete`; runs inside the caller's transaction. Set-based: one read of every
    task named, one guarded UPDATE of all of them, one INSERT of all next-stage tasks."""
    rows = settle_rows(db, [item.task_id for item in items])
    plan = rules.plan_completions(items, rows, lambda name: workflows.get(db, name), holder)
    moved: set[int] = set()
    for start in range(0, len(plan.done), _INSERT_ROWS):
        batch = plan.done[start : start + _INSERT_ROWS]
        # No RETURNING: it costs a tenth of this statement in SQLite. The count of rows changed
        # says whether every one moved; only a shortfall is looked up (never, in one process).
        before = db.total_changes  # (rowcount: Python's sqlite3 sees no DML in a WITH)
        db.execute(
            "WITH d (id, lease_id, pathway, output) AS (VALUES "
            + ", ".join(["(?, ?, ?, ?)"] * len(batch))
            + ") UPDATE tasks SET state = 'done', pathway = d.pathway, output = d.output, "
            "finished_at = ?, lease_deadline = NULL, session_id = NULL, server_id = NULL, "
            "detached_at = NULL FROM d "
            "WHERE tasks.id = d.id AND tasks.state = 'leased' AND tasks.lease_id = d.lease_id",
            [*(value for c in batch for value in c), now],
        )
        if db.total_changes - before == len(batch):
            moved.update(c.task_id for c in batch)
        else:
            after = settle_rows(db, [c.task_id for c in batch])
            moved.update(
                c.task_id
                for c in batch
                if (row := after.get(c.task_id)) is not None
                and (row.state, row.lease_id, row.pathway) == ("done", c.lease_id, c.pathway)
            )
    follow = [(task_id, stage) for task_id, stage in plan.follow.items() if task_id in moved]
    next_ids: dict[int, int] = {}
    for start in range(0, len(follow), _INSERT_ROWS):
        created = follow[start : start + _INSERT_ROWS]
        next_ids.update(
            (previous, task)
            for task, previous in db.execute(
                "WITH n (previous, stage, max_attempts) AS (VALUES "
                + ", ".join(["(?, ?, ?)"] * len(created))
                + ") INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, "
                "state, priority, max_attempts, created_at, ready_at, input, "
                "previous_task_id) SELECT t.workflow, n.stage, t.agent_run_id, "
                "t.collection_id, 'ready', t.priority, n.max_attempts, ?, ?, t.output, "
                "t.id FROM n JOIN tasks t ON t.id = n.previous WHERE true "
                "ON CONFLICT DO NOTHING RETURNING id, previous_task_id",
                [
                    *(
                        v
                        for task_id, stage in created
                        for v in (task_id, stage.name, stage.max_attempts)
                    ),
                    now,
                    now,
                ],
            )
        )
    add_counts(db, Counter((rows[t].workflow, rows[t].stage, "done") for t in moved))
    missed = {c.task_id for c in plan.done if c.task_id not in moved}
    reread = settle_rows(db, list(missed)) if missed else {}
    acks = []
    for item, ack in zip(items, plan.acks, strict=True):
        if ack is not None:
            acks.append(ack)
        elif item.task_id in missed:  # another process settled it between our read and write
            row = reread.get(item.task_id)
            acks.append(
                rules.answer_miss(
                    "complete", item.task_id, item.lease_id, row, item.pathway, holder
                )
            )
        else:
            acks.append(
                Ack(
                    item.task_id,
                    item.lease_id,
                    next_task_id=next_ids.get(item.task_id),
                    stage=rows[item.task_id].stage,
                    result="done",
                )
            )
    return acks


def record_failure(
    db: sqlite3.Connection, task_id: int, attempt: int, lease_id: str | None, error: str, now: float
) -> None:
    """Put a failed attempt on record (a redriven task's new attempt replaces its old one)."""
    db.execute(
        "INSERT INTO task_failures (task_id, attempt, lease_id, error, failed_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id, attempt) DO UPDATE SET "
        "lease_id = excluded.lease_id, error = excluded.error, failed_at = excluded.failed_at",
        (task_id, attempt, lease_id, error, now),
    )


def end_attempt(
    db: sqlite3.Connection, row: SettleRow, dead: bool, ready_at: float, now: float
) -> bool:
    """Move a leased task, under its current lease, to dead or back to ready; whether it moved."""
    if dead:
        sql = (
            "UPDATE tasks SET state = 'dead', finished_at = ?, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL "
            "WHERE id = ? AND state = 'leased' AND lease_id = ? RETURNING id"
        )
        args: tuple[Any, ...] = (now, row.task_id, row.lease_id)
    else:
        sql = (
            "UPDATE tasks SET state = 'ready', ready_at = ?, lease_id = NULL, "
            "lease_deadline = NULL, session_id = NULL, server_id = NULL, detached_at = NULL "
            "WHERE id = ? AND state = 'leased' AND lease_id = ? RETURNING id"
        )
        args = (ready_at, row.task_id, row.lease_id)
    if db.execute(sql, args).fetchone() is None:
        return False
    if dead:
        add_counts(db, Counter({(row.workflow, row.stage, "dead"): 1}))
    return True


def fail(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    items: Sequence[Failure],
    now: float,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.fail`; runs inside the caller's transaction."""
    acks = []
    for item in items:
        row = settle_row(db, item.task_id, item.lease_id)
        if row is None or not rules.is_current(row, item.lease_id, holder):
            acks.append(rules.answer_miss("fail", item.task_id, item.lease_id, row, "", holder))
            continue
        dead, delay = rules.failure_outcome(row, item, stage_of(workflows, db, row))
        if not end_attempt(db, row, dead, now + delay, now):
            row = settle_row(db, item.task_id, item.lease_id)
            acks.append(rules.answer_miss("fail", item.task_id, item.lease_id, row))
            continue
        record_failure(db, item.task_id, row.attempt, item.lease_id, item.error, now)
        acks.append(
            Ack(item.task_id, item.lease_id, stage=row.stage, result="dead" if dead else "retry")
        )
    return acks


def extend(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    items: Sequence[Extension],
    now: float,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.extend`; runs inside the caller's transaction."""
    acks = []
    rows = settle_rows(db, [item.task_id for item in items])
    for item in items:
        row = rows.get(item.task_id)
        if row is None or not rules.is_current(row, item.lease_id, holder):
            acks.append(rules.settle_error(item.task_id, item.lease_id, row, holder))
            continue
        seconds = item.lease_seconds
        if seconds is None:
            seconds = stage_of(workflows, db, row).lease_seconds
        moved = db.execute(
            "UPDATE tasks SET lease_deadline = ? WHERE id = ? AND state = 'leased' "
            "AND lease_id = ? RETURNING lease_deadline",
            (now + seconds, item.task_id, item.lease_id),
        ).fetchone()
        if moved is None:
            acks.append(
                rules.settle_error(
                    item.task_id, item.lease_id, settle_row(db, item.task_id, item.lease_id)
                )
            )
            continue
        acks.append(
            Ack(item.task_id, item.lease_id, deadline=moved[0], stage=row.stage, result="extended")
        )
    return acks


def release(
    db: sqlite3.Connection, items: Sequence[Release], now: float, holder: str = ""
) -> list[Ack]:
    """See `Storage.release`; runs inside the caller's transaction. The lease id stays on the
    ready task until it is leased again, so a repeated release is recognised."""
    acks = []
    for item in items:
        moved = db.execute(
            "UPDATE tasks SET state = 'ready', attempt = attempt - 1, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL, "
            "ready_at = CASE WHEN ? > 0 THEN ? ELSE ready_at END "
            "WHERE id = ? AND state = 'leased' AND lease_id = ? "
            "AND (? = '' OR session_id IS NULL OR session_id = ?) RETURNING stage",
            (
                item.delay_seconds,
                now + item.delay_seconds,
                item.task_id,
                item.lease_id,
                holder,
                holder,
            ),
        ).fetchone()
        if moved is None:
            row = settle_row(db, item.task_id, item.lease_id)
            acks.append(rules.answer_miss("release", item.task_id, item.lease_id, row, "", holder))
            continue
        acks.append(Ack(item.task_id, item.lease_id, stage=moved[0], result="released"))
    return acks
