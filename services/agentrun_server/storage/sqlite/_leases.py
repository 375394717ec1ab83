"""Statements on leases as a whole: streams that end, workers that resume, servers' heartbeats,
expiry and recovery, cancel and redrive.

A lease belongs to its lease id, not to a stream: a stream that ends without handing its leases
back detaches them (`detach_session`), a worker that reconnects resumes them (`resume`), and the
sweep (`sweep`) ends those nobody resumed within the grace, the leases of servers gone silent as
much as those of closed streams.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from typing import Any

from agentrun_server._errors import InvalidArgument
from agentrun_server.storage import _rules as rules
from agentrun_server.storage._rules import SettleRow
from agentrun_server.storage._types import Ack, EndedLease, LeaseRef, Revocation
from agentrun_server.storage.sqlite._counts import CountKey, add_counts
from agentrun_server.storage.sqlite._engine import select_in, transaction
from agentrun_server.storage.sqlite._settles import end_attempt, record_failure, settle_row

REVOCATIONS_KEPT_SECONDS = 60.0
"""How long a revocation stays readable for the process serving its stream."""


def _end_leases(
    db: sqlite3.Connection, where: str, args: Sequence[Any], why: str, now: float
) -> list[EndedLease]:
    """End the leases matching `where`: the attempt counts; ready again, or dead when spent."""
    rows = db.execute(
        "SELECT id, state, lease_id, workflow, stage, attempt, max_attempts, pathway, 0, "
        f"session_id FROM tasks WHERE state = 'leased' AND {where}",
        args,
    ).fetchall()
    ended = []
    for fields in rows:
        row = SettleRow._make(fields)
        session_id = row.session_id
        dead = rules.lease_end_is_dead(row.attempt, row.max_attempts)
        if end_attempt(db, row, dead, now, now):
            record_failure(db, row.task_id, row.attempt, row.lease_id, why, now)
            assert row.lease_id is not None
            ended.append(
                EndedLease(row.task_id, row.lease_id, session_id, row.workflow, row.stage, dead)
            )
    return ended


def _revoke(db: sqlite3.Connection, leases: Sequence[EndedLease], reason: str, now: float) -> None:
    """Record revocations of leases that a live stream held, for its process to pass on."""
    db.executemany(
        "INSERT INTO lease_revocations (task_id, lease_id, session_id, reason, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [(e.task_id, e.lease_id, e.session_id, reason, now) for e in leases if e.session_id],
    )


def release_session(db: sqlite3.Connection, session_id: str, now: float) -> list[EndedLease]:
    """See `Storage.release_session`."""
    with transaction(db):
        return _end_leases(db, "session_id = ?", (session_id,), rules.STREAM_CLOSED, now)


def detach_session(db: sqlite3.Connection, session_id: str, now: float) -> int:
    """See `Storage.detach_session`."""
    with transaction(db):
        return db.execute(
            "UPDATE tasks SET session_id = NULL, server_id = NULL, detached_at = ? "
            "WHERE state = 'leased' AND session_id = ?",
            (now, session_id),
        ).rowcount


def resume(
    db: sqlite3.Connection, session_id: str, server_id: str, items: Sequence[LeaseRef], now: float
) -> list[Ack]:
    """See `Storage.resume`."""
    acks = []
    with transaction(db):
        for item in items:
            moved = db.execute(
                "UPDATE tasks SET session_id = ?, server_id = ?, detached_at = NULL "
                "WHERE id = ? AND state = 'leased' AND lease_id = ? RETURNING lease_deadline, stage",
                (session_id, server_id or None, item.task_id, item.lease_id),
            ).fetchone()
            if moved is None:
                row = settle_row(db, item.task_id, item.lease_id)
                acks.append(rules.settle_error(item.task_id, item.lease_id, row))
            else:
                acks.append(
                    Ack(
                        item.task_id,
                        item.lease_id,
                        deadline=moved[0],
                        stage=moved[1],
                        result="resumed",
                    )
                )
    return acks


def heartbeat(db: sqlite3.Connection, server_id: str, host: str, pid: int, now: float) -> None:
    """See `Storage.heartbeat`."""
    with transaction(db):
        db.execute(
            "INSERT INTO servers (id, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (server_id, host, pid, now, now),
        )


def remove_server(db: sqlite3.Connection, server_id: str) -> None:
    """See `Storage.remove_server`."""
    with transaction(db):
        db.execute("DELETE FROM servers WHERE id = ?", (server_id,))


def sweep(
    db: sqlite3.Connection, now: float, grace_seconds: float
) -> tuple[list[EndedLease], list[EndedLease]]:
    """See `Storage.sweep`."""
    with transaction(db):
        # A server silent past the grace is gone: its leases are detached since its last sign.
        for server_id, heartbeat_at in db.execute(
            "SELECT id, heartbeat_at FROM servers WHERE heartbeat_at < ?", (now - grace_seconds,)
        ).fetchall():
            db.execute(
                "UPDATE tasks SET session_id = NULL, server_id = NULL, detached_at = ? "
                "WHERE state = 'leased' AND server_id = ?",
                (heartbeat_at, server_id),
            )
            db.execute("DELETE FROM servers WHERE id = ?", (server_id,))
        expired = _end_leases(db, "lease_deadline < ?", (now,), rules.LEASE_EXPIRED, now)
        _revoke(db, expired, "expired", now)
        recovered = _end_leases(
            db,
            "session_id IS NULL AND detached_at <= ?",
            (now - grace_seconds,),
            rules.NOT_RESUMED.format(grace=grace_seconds),
            now,
        )
        db.execute(
            "DELETE FROM lease_revocations WHERE created_at < ?", (now - REVOCATIONS_KEPT_SECONDS,)
        )
        return expired, recovered


def revocations_after(db: sqlite3.Connection, after_id: int) -> tuple[int, list[Revocation]]:
    """See `Storage.revocations_after`."""
    rows = db.execute(
        "SELECT id, task_id, lease_id, session_id, reason FROM lease_revocations WHERE id > ? "
        "ORDER BY id",
        (after_id,),
    ).fetchall()
    if not rows:
        if after_id < 0:  # first read: start from the newest
            (last,) = db.execute("SELECT coalesce(max(id), 0) FROM lease_revocations").fetchone()
            return int(last), []
        return after_id, []
    return rows[-1][0], [Revocation._make(row[1:]) for row in rows]


def _select_ids(
    db: sqlite3.Connection,
    states: Sequence[str],
    workflow: str,
    stage: str,
    task_ids: Sequence[int],
) -> list[tuple[Any, ...]]:
    """(id, state, lease_id, session_id, workflow, stage) of the tasks in `states` that the
    arguments name: by id, else all of a workflow (and stage)."""
    columns = "id, state, lease_id, session_id, workflow, stage"
    in_states = f"state IN ({','.join('?' * len(states))})"
    if task_ids:
        return list(
            select_in(
                db,
                f"SELECT {columns} FROM tasks WHERE {in_states} AND id IN ({{ids}})",
                task_ids,
                *states,
            )
        )
    if not workflow:
        raise InvalidArgument("workflow: required when no task_ids are given")
    found = []
    stages = [stage] if stage else _stages(db, workflow)
    for name in stages:  # one index range per stage and state: never the finished tasks
        for state in states:
            found += db.execute(
                f"SELECT {columns} FROM tasks WHERE workflow = ? AND stage = ? AND state = ?",
                (workflow, name, state),
            ).fetchall()
    return found


def _stages(db: sqlite3.Connection, workflow: str) -> list[str]:
    """Every stage that may hold tasks of `workflow`: its definition's, and any stage a task
    ended in (a newer definition may have dropped it; ready and leased tasks keep theirs)."""
    names: dict[str, None] = {}
    row = db.execute("SELECT definition FROM workflows WHERE name = ?", (workflow,)).fetchone()
    if row is not None:
        names.update((s["name"], None) for s in json.loads(row[0]))
    names.update(
        (r[0], None)
        for r in db.execute(
            "SELECT DISTINCT stage FROM task_counts WHERE workflow = ?", (workflow,)
        )
    )
    return list(names)


def cancel(
    db: sqlite3.Connection, workflow: str, stage: str, task_ids: Sequence[int], now: float
) -> tuple[int, list[EndedLease]]:
    """See `Storage.cancel`."""
    with transaction(db):
        found = {
            row[0]: row
            for row in _select_ids(db, ("ready", "leased", "dead"), workflow, stage, task_ids)
        }
        moved = [
            row[0]
            for row in select_in(
                db,
                "UPDATE tasks SET state = 'cancelled', finished_at = ?, lease_deadline = NULL, "
                "session_id = NULL, server_id = NULL, detached_at = NULL "
                "WHERE state IN ('ready', 'leased', 'dead') AND id IN ({ids}) RETURNING id",
                list(found),
                now,
            )
        ]
        counts: Counter[CountKey] = Counter()
        ended = []
        for task_id in moved:
            _, state, lease_id, session_id, workflow_name, stage_name = found[task_id]
            counts[(workflow_name, stage_name, "cancelled")] += 1
            if state == "dead":
                counts[(workflow_name, stage_name, "dead")] -= 1
            if state == "leased":
                ended.append(
                    EndedLease(task_id, lease_id, session_id, workflow_name, stage_name, False)
                )
        add_counts(db, counts)
        _revoke(db, ended, "cancelled", now)
        return len(moved), ended


def redrive(
    db: sqlite3.Connection, workflow: str, stage: str, task_ids: Sequence[int], now: float
) -> int:
    """See `Storage.redrive`. OR IGNORE: a dead task whose run has a ready or leased task in the
    workflow again (the unique index) stays dead."""
    with transaction(db):
        found = [row[0] for row in _select_ids(db, ("dead",), workflow, stage, task_ids)]
        moved = list(
            select_in(
                db,
                "UPDATE OR IGNORE tasks SET state = 'ready', attempt = 0, ready_at = ?, "
                "finished_at = NULL, lease_id = NULL WHERE state = 'dead' AND id IN ({ids}) "
                "RETURNING workflow, stage",
                found,
                now,
            )
        )
        add_counts(db, Counter({(w, s, "dead"): -n for (w, s), n in Counter(moved).items()}))
        return len(moved)
