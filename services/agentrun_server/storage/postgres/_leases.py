"""Statements on leases as a whole: streams that end, workers that resume, servers' heartbeats,
expiry and recovery, cancel and redrive. The sweep runs on every replica at once: it locks what it
ends with `FOR UPDATE SKIP LOCKED` and every change is guarded, so each lease ends once."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agentrun_server._errors import InvalidArgument
from agentrun_server.storage import _rules as rules
from agentrun_server.storage._rules import SettleRow
from agentrun_server.storage._types import Ack, EndedLease, LeaseRef, Revocation
from agentrun_server.storage.postgres._engine import NOW, Connection
from agentrun_server.storage.postgres._runs import notify_ready
from agentrun_server.storage.postgres._tasks import SHARD, settle_row

REVOCATIONS_KEPT_SECONDS = 60.0


async def _end_leases(
    conn: Connection, where: str, params: dict[str, Any], why: str, now: float | None
) -> list[EndedLease]:
    """End the leases matching `where` (not locked by another transaction): the attempt counts;
    ready again, or dead when spent."""
    cursor = await conn.execute(
        "SELECT id, state, lease_id, workflow, stage, attempt, max_attempts, pathway, false, "
        f"session_id FROM tasks WHERE state = 'leased' AND {where} ORDER BY id "
        "FOR UPDATE SKIP LOCKED",
        {**params, "now": now},
    )
    found = await cursor.fetchall()
    if not found:
        return []
    rows = [(row, row.session_id) for row in map(SettleRow._make, found)]
    dead = [rules.lease_end_is_dead(row.attempt, row.max_attempts) for row, _ in rows]
    cursor = await conn.execute(
        "WITH e AS (SELECT * FROM unnest(%(ids)s::bigint[], %(leases)s::text[], %(dead)s::bool[]) "
        "AS e(id, lease_id, dead)), "
        "moved AS (UPDATE tasks t SET state = CASE WHEN e.dead THEN 'dead' ELSE 'ready' END, "
        f"ready_at = CASE WHEN e.dead THEN t.ready_at ELSE {NOW} END, "
        f"finished_at = CASE WHEN e.dead THEN {NOW} END, "
        "lease_id = CASE WHEN e.dead THEN t.lease_id END, lease_deadline = NULL, "
        "session_id = NULL, server_id = NULL, detached_at = NULL FROM e "
        "WHERE t.id = e.id AND t.state = 'leased' AND t.lease_id = e.lease_id "
        "RETURNING t.id, t.attempt, e.lease_id, t.workflow, t.stage, e.dead), "
        "failures AS (INSERT INTO task_failures (task_id, attempt, lease_id, error, failed_at) "
        f"SELECT id, attempt, lease_id, %(why)s, {NOW} FROM moved "
        "ON CONFLICT (task_id, attempt) DO UPDATE SET lease_id = excluded.lease_id, "
        "error = excluded.error, failed_at = excluded.failed_at), "
        "counted AS (INSERT INTO task_counts (workflow, stage, state, shard, count) "
        f"SELECT workflow, stage, 'dead', {SHARD}, count(*) FROM moved WHERE dead "
        "GROUP BY workflow, stage ON CONFLICT (workflow, stage, state, shard) "
        "DO UPDATE SET count = task_counts.count + excluded.count) "
        "SELECT id FROM moved",
        {
            "ids": [row.task_id for row, _ in rows],
            "leases": [row.lease_id for row, _ in rows],
            "dead": dead,
            "why": why,
            "now": now,
        },
    )
    moved = {r[0] for r in await cursor.fetchall()}
    ended = [
        EndedLease(row.task_id, row.lease_id or "", session, row.workflow, row.stage, is_dead)
        for (row, session), is_dead in zip(rows, dead, strict=True)
        if row.task_id in moved
    ]
    for workflow in {e.workflow for e in ended if not e.dead}:
        await notify_ready(conn, workflow)
    return ended


async def _revoke(
    conn: Connection, leases: Sequence[EndedLease], reason: str, now: float | None
) -> None:
    """Record revocations of leases that a live stream held, and tell every replica."""
    live = [e for e in leases if e.session_id]
    if not live:
        return
    await conn.execute(
        "INSERT INTO lease_revocations (task_id, lease_id, session_id, reason, created_at) "
        f"SELECT task, lease, session, %(reason)s, {NOW} FROM unnest(%(tasks)s::bigint[], "
        "%(leases)s::text[], %(sessions)s::text[]) AS r(task, lease, session)",
        {
            "tasks": [e.task_id for e in live],
            "leases": [e.lease_id for e in live],
            "sessions": [e.session_id for e in live],
            "reason": reason,
            "now": now,
        },
    )
    await conn.execute("SELECT pg_notify('agentrun_revoked', '')")


async def release_session(conn: Connection, session_id: str, now: float | None) -> list[EndedLease]:
    """See `Storage.release_session`."""
    return await _end_leases(
        conn, "session_id = %(session)s", {"session": session_id}, rules.STREAM_CLOSED, now
    )


async def detach_session(conn: Connection, session_id: str, now: float | None) -> int:
    """See `Storage.detach_session`."""
    cursor = await conn.execute(
        f"UPDATE tasks SET session_id = NULL, server_id = NULL, detached_at = {NOW} "
        "WHERE state = 'leased' AND session_id = %(session)s",
        {"session": session_id, "now": now},
    )
    return cursor.rowcount


async def resume(
    conn: Connection, session_id: str, server_id: str, items: Sequence[LeaseRef], now: float | None
) -> list[Ack]:
    """See `Storage.resume`."""
    acks = []
    for item in items:
        cursor = await conn.execute(
            "UPDATE tasks SET session_id = %s, server_id = %s, detached_at = NULL "
            "WHERE id = %s AND state = 'leased' AND lease_id = %s RETURNING lease_deadline, stage",
            (session_id, server_id or None, item.task_id, item.lease_id),
        )
        moved = await cursor.fetchone()
        if moved is None:
            row = await settle_row(conn, item.task_id, item.lease_id)
            acks.append(rules.settle_error(item.task_id, item.lease_id, row))
        else:
            acks.append(
                Ack(
                    item.task_id, item.lease_id, deadline=moved[0], stage=moved[1], result="resumed"
                )
            )
    return acks


async def heartbeat(
    conn: Connection, server_id: str, host: str, pid: int, now: float | None
) -> None:
    """See `Storage.heartbeat`."""
    await conn.execute(
        "INSERT INTO servers (id, host, pid, started_at, heartbeat_at) "
        f"VALUES (%(id)s, %(host)s, %(pid)s, {NOW}, {NOW}) "
        "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        {"id": server_id, "host": host, "pid": pid, "now": now},
    )


async def remove_server(conn: Connection, server_id: str) -> None:
    """See `Storage.remove_server`."""
    await conn.execute("DELETE FROM servers WHERE id = %s", (server_id,))


async def sweep(
    conn: Connection, now: float | None, grace_seconds: float
) -> tuple[list[EndedLease], list[EndedLease]]:
    """See `Storage.sweep`."""
    params = {"grace": grace_seconds, "now": now}
    # A server silent past the grace is gone: its leases are detached since its last sign.
    await conn.execute(
        "WITH gone AS (DELETE FROM servers WHERE id IN (SELECT id FROM servers "
        f"WHERE heartbeat_at < {NOW} - %(grace)s FOR UPDATE SKIP LOCKED) "
        "RETURNING id, heartbeat_at) "
        "UPDATE tasks t SET session_id = NULL, server_id = NULL, detached_at = gone.heartbeat_at "
        "FROM gone WHERE t.state = 'leased' AND t.server_id = gone.id",
        params,
    )
    expired = await _end_leases(conn, f"lease_deadline < {NOW}", {}, rules.LEASE_EXPIRED, now)
    await _revoke(conn, expired, "expired", now)
    recovered = await _end_leases(
        conn,
        f"session_id IS NULL AND detached_at <= {NOW} - %(grace)s",
        {"grace": grace_seconds},
        rules.NOT_RESUMED.format(grace=grace_seconds),
        now,
    )
    await conn.execute(
        f"DELETE FROM lease_revocations WHERE created_at < {NOW} - %(kept)s",
        {"kept": REVOCATIONS_KEPT_SECONDS, "now": now},
    )
    return expired, recovered


async def revocations_after(conn: Connection, after_id: int) -> tuple[int, list[Revocation]]:
    """See `Storage.revocations_after`."""
    if after_id < 0:
        cursor = await conn.execute("SELECT coalesce(max(id), 0) FROM lease_revocations")
        row = await cursor.fetchone()
        return (int(row[0]) if row else 0), []
    cursor = await conn.execute(
        "SELECT id, task_id, lease_id, session_id, reason FROM lease_revocations "
        "WHERE id > %s ORDER BY id",
        (after_id,),
    )
    rows = await cursor.fetchall()
    if not rows:
        return after_id, []
    return rows[-1][0], [Revocation._make(row[1:]) for row in rows]


async def _stages(conn: Connection, workflow: str) -> list[str]:
    """Every stage that may hold tasks of `workflow`: its definition's, and any a task ended in."""
    names: dict[str, None] = {}
    cursor = await conn.execute("SELECT definition FROM workflows WHERE name = %s", (workflow,))
    row = await cursor.fetchone()
    if row is not None:
        names.update((s["name"], None) for s in json.loads(row[0]))
    cursor = await conn.execute(
        "SELECT DISTINCT stage FROM task_counts WHERE workflow = %s", (workflow,)
    )
    names.update((r[0], None) for r in await cursor.fetchall())
    return list(names)


async def _selection(
    conn: Connection, workflow: str, stage: str, task_ids: Sequence[int]
) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (without states) of a cancel or redrive, and its parameters."""
    if task_ids:
        return "id = ANY(%(ids)s)", {"ids": list(task_ids)}
    if not workflow:
        raise InvalidArgument("workflow: required when no task_ids are given")
    stages = [stage] if stage else await _stages(conn, workflow)
    return "workflow = %(workflow)s AND stage = ANY(%(stages)s)", {
        "workflow": workflow,
        "stages": stages,
    }


async def cancel(
    conn: Connection, workflow: str, stage: str, task_ids: Sequence[int], now: float | None
) -> tuple[int, list[EndedLease]]:
    """See `Storage.cancel`. The tasks are locked as they are chosen, so their prior state
    (a lease ended, a dead letter counted out) is exact."""
    where, params = await _selection(conn, workflow, stage, task_ids)
    cursor = await conn.execute(
        "WITH chosen AS (SELECT id, state, lease_id, session_id, workflow, stage FROM tasks "
        f"WHERE state IN ('ready', 'leased', 'dead') AND {where} ORDER BY id FOR UPDATE), "
        f"moved AS (UPDATE tasks t SET state = 'cancelled', finished_at = {NOW}, "
        "lease_deadline = NULL, session_id = NULL, server_id = NULL, detached_at = NULL "
        "FROM chosen WHERE t.id = chosen.id RETURNING t.id) "
        "SELECT chosen.* FROM chosen JOIN moved USING (id)",
        {**params, "now": now},
    )
    moved = await cursor.fetchall()
    counts: dict[tuple[str, str, str], int] = {}
    ended = []
    for task_id, state, lease_id, session_id, workflow_name, stage_name in moved:
        key = (workflow_name, stage_name, "cancelled")
        counts[key] = counts.get(key, 0) + 1
        if state == "dead":
            dead = (workflow_name, stage_name, "dead")
            counts[dead] = counts.get(dead, 0) - 1
        if state == "leased":
            ended.append(
                EndedLease(task_id, lease_id, session_id, workflow_name, stage_name, False)
            )
    await add_counts(conn, counts)
    await _revoke(conn, ended, "cancelled", now)
    return len(moved), ended


async def redrive(
    conn: Connection, workflow: str, stage: str, task_ids: Sequence[int], now: float | None
) -> int:
    """See `Storage.redrive`: per run, its newest dead task, unless the run has a ready or
    leased task in the workflow again (a race with one made meanwhile aborts and reruns this)."""
    where, params = await _selection(conn, workflow, stage, task_ids)
    cursor = await conn.execute(
        "WITH chosen AS (SELECT DISTINCT ON (agent_run_id, workflow) id FROM tasks d "
        f"WHERE state = 'dead' AND {where} AND NOT EXISTS (SELECT 1 FROM tasks a "
        "WHERE a.agent_run_id = d.agent_run_id AND a.workflow = d.workflow "
        "AND a.finished_at IS NULL) ORDER BY agent_run_id, workflow, id DESC) "
        f"UPDATE tasks t SET state = 'ready', attempt = 0, ready_at = {NOW}, finished_at = NULL, "
        "lease_id = NULL FROM chosen WHERE t.id = chosen.id AND t.state = 'dead' "
        "RETURNING t.workflow, t.stage",
        {**params, "now": now},
    )
    moved = await cursor.fetchall()
    counts: dict[tuple[str, str, str], int] = {}
    for workflow_name, stage_name in moved:
        key = (workflow_name, stage_name, "dead")
        counts[key] = counts.get(key, 0) - 1
    await add_counts(conn, counts)
    for workflow_name in {w for w, _ in moved}:
        await notify_ready(conn, workflow_name)
    return len(moved)


async def add_counts(conn: Connection, counts: dict[tuple[str, str, str], int]) -> None:
    """Add to the kept counts of ended tasks, on this connection's shard."""
    changed = [(key, n) for key, n in counts.items() if n]
    if not changed:
        return
    await conn.execute(
        "INSERT INTO task_counts (workflow, stage, state, shard, count) "
        f"SELECT w, s, st, {SHARD}, n FROM unnest(%(w)s::text[], %(s)s::text[], %(st)s::text[], "
        "%(n)s::bigint[]) AS c(w, s, st, n) ON CONFLICT (workflow, stage, state, shard) "
        "DO UPDATE SET count = task_counts.count + excluded.count",
        {
            "w": [k[0] for k, _ in changed],
            "s": [k[1] for k, _ in changed],
            "st": [k[2] for k, _ in changed],
            "n": [n for _, n in changed],
        },
    )
