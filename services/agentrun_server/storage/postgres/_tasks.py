"""Statements that create, lease and settle tasks: enqueue, claim, complete, fail, extend,
release. Every state change is one guarded statement (`state = 'ready'` for a claim, `state =
'leased' AND lease_id = ...` for a settle) returning what moved; what a settle means is decided by
`storage._rules`. A claim locks its candidates with `FOR UPDATE SKIP LOCKED`, so replicas claiming
at once take different tasks instead of waiting for each other.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from psycopg.rows import tuple_row

from agentrun_server._errors import NotFound
from agentrun_server.storage import _rules as rules
from agentrun_server.storage._rules import Candidate, SettleRow, choose_claims
from agentrun_server.storage._types import (
    Ack,
    ClaimRequest,
    Completion,
    Extension,
    Failure,
    LeasedTask,
    Release,
    StageDef,
)
from agentrun_server.storage.postgres._engine import NOW, Connection
from agentrun_server.storage.postgres._runs import WorkflowCache, notify_ready

SHARD = "(pg_backend_pid() %% 16)"  # %% : a literal % in a statement with parameters
"""The task_counts shard a transaction adds to: its connection's."""
_SETTLE_COLUMNS = "id, state, lease_id, workflow, stage, attempt, max_attempts, pathway"


async def settle_rows(conn: Connection, task_ids: Sequence[int]) -> dict[int, SettleRow]:
    """The tasks named, by id (absent: no such task)."""
    cursor = await conn.execute(
        f"SELECT {_SETTLE_COLUMNS}, NULL, session_id FROM tasks WHERE id = ANY(%s)",
        (list(set(task_ids)),),
    )
    return {row[0]: SettleRow._make(row) for row in await cursor.fetchall()}


async def settle_row(conn: Connection, task_id: int, lease_id: str) -> SettleRow | None:
    """One task, and the error of a failure on record under `lease_id` (if any)."""
    cursor = await conn.execute(
        f"SELECT {_SETTLE_COLUMNS}, (SELECT error FROM task_failures f "
        "WHERE f.task_id = tasks.id AND f.lease_id = %s LIMIT 1), session_id FROM tasks "
        "WHERE id = %s",
        (lease_id, task_id),
    )
    row = await cursor.fetchone()
    return None if row is None else SettleRow._make(row)


async def enqueue(
    conn: Connection,
    workflows: WorkflowCache,
    workflow_name: str,
    stage_name: str,
    run_ids: Sequence[str],
    priority: int,
    now: float | None,
) -> tuple[int, int]:
    """See `Storage.enqueue`: the unique index on a run's active task decides what is skipped."""
    workflow = await workflows.get(conn, workflow_name)
    stage = workflow.stage(stage_name) if stage_name else workflow.first_stage
    unique = list(dict.fromkeys(run_ids))
    cursor = await conn.execute(
        "SELECT id, collection_id FROM agent_runs WHERE id = ANY(%s)", (unique,)
    )
    collections: dict[str, str] = dict(await cursor.fetchall())
    for run_id in unique:
        if run_id not in collections:
            raise NotFound(f"no agent run with id {run_id!r}")
    cursor = await conn.execute(
        "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, priority, "
        f"max_attempts, created_at, ready_at) SELECT %(workflow)s, %(stage)s, r.id, r.collection, "
        f"'ready', %(priority)s, %(max)s, {NOW}, {NOW} "
        "FROM unnest(%(ids)s::text[], %(collections)s::text[]) AS r(id, collection) "
        "ON CONFLICT DO NOTHING RETURNING id",
        {
            "workflow": workflow.name,
            "stage": stage.name,
            "priority": priority,
            "max": stage.max_attempts,
            "ids": unique,
            "collections": [collections[run_id] for run_id in unique],
            "now": now,
        },
    )
    enqueued = len(await cursor.fetchall())
    if enqueued:
        await notify_ready(conn, workflow.name)
    return enqueued, len(unique) - enqueued


async def claim(
    conn: Connection, workflows: WorkflowCache, request: ClaimRequest, now: float | None
) -> list[LeasedTask]:
    """See `Storage.claim`; runs inside the caller's transaction."""
    stages = [s for s, n in request.stage_limits.items() if n > 0]
    if request.limit <= 0 or not stages:
        return []
    workflow = await workflows.get(conn, request.workflow)
    # Each stage's first ready tasks in dispatch order, off its own range of the tasks_ready
    # index, locked; those another replica holds locked are skipped, not waited for.
    cursor = await conn.execute(
        "SELECT c.priority, c.ready_at, c.id, c.stage, c.size "
        "FROM unnest(%(stages)s::text[], %(limits)s::int[]) AS s(stage, lim) "
        "CROSS JOIN LATERAL (SELECT t.priority, t.ready_at, t.id, t.stage, "
        "coalesce(length(t.input), 0) + r.size_bytes AS size FROM tasks t "
        "JOIN agent_runs r ON r.id = t.agent_run_id "
        "WHERE t.state = 'ready' AND t.workflow = %(workflow)s AND t.stage = s.stage "
        f"AND t.ready_at <= {NOW} ORDER BY t.priority DESC, t.ready_at, t.id "
        "LIMIT s.lim FOR UPDATE OF t SKIP LOCKED) AS c",
        {
            "stages": stages,
            "limits": [min(request.limit, request.stage_limits[s]) for s in stages],
            "workflow": workflow.name,
            "now": now,
        },
    )
    candidates = [Candidate._make(row) for row in await cursor.fetchall()]
    if not candidates:
        return []
    chosen = choose_claims(candidates, request.limit, request.max_bytes)
    seconds = {s: request.lease_seconds or workflow.stage(s).lease_seconds for s in stages}
    async with conn.cursor(binary=True, row_factory=tuple_row) as binary:
        await binary.execute(
            "WITH c AS (SELECT * FROM unnest(%(ids)s::bigint[], %(leases)s::text[], "
            "%(seconds)s::float8[]) AS c(id, lease_id, seconds)), "
            "u AS (UPDATE tasks t SET state = 'leased', attempt = t.attempt + 1, "
            "lease_id = c.lease_id, session_id = %(session)s, server_id = %(server)s, "
            f"detached_at = NULL, lease_deadline = {NOW} + c.seconds FROM c "
            "WHERE t.id = c.id AND t.state = 'ready' "
            "RETURNING t.id, t.lease_id, t.attempt, t.max_attempts, t.lease_deadline, t.stage, "
            "t.agent_run_id, t.collection_id, t.priority, t.input, t.created_at) "
            "SELECT u.*, r.data FROM u JOIN agent_runs r ON r.id = u.agent_run_id",
            {
                "ids": [c.task_id for c in chosen],
                "leases": [secrets.token_hex(12) for _ in chosen],
                "seconds": [seconds[c.stage] for c in chosen],
                "session": request.session_id,
                "server": request.server_id or None,
                "now": now,
            },
        )
        leased: list[tuple[Any, ...]] = await binary.fetchall()
    leased.sort(key=lambda row: (-row[8], row[10], row[0]))
    return [LeasedTask._make(row) for row in leased]


async def complete(
    conn: Connection,
    workflows: WorkflowCache,
    items: Sequence[Completion],
    now: float | None,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.complete`; runs inside the caller's transaction. One read of every task
    named; then one statement marks them done (guarded), creates the next stages' tasks, counts
    them, and tells the replicas that tasks are ready."""
    rows = await settle_rows(conn, [item.task_id for item in items])
    definitions = await workflows.many(conn, {row.workflow for row in rows.values()})
    plan = rules.plan_completions(items, rows, definitions.__getitem__, holder)
    next_ids: dict[int, int | None] = {}
    if plan.done:
        follow = [plan.follow.get(c.task_id) for c in plan.done]
        cursor = await conn.execute(
            "WITH d AS (SELECT * FROM unnest(%(ids)s::bigint[], %(leases)s::text[], "
            "%(pathways)s::text[], %(outputs)s::bytea[], %(next)s::text[], %(max)s::int[]) "
            "AS d(id, lease_id, pathway, output, next_stage, next_max)), "
            "done AS (UPDATE tasks t SET state = 'done', pathway = d.pathway, output = d.output, "
            f"finished_at = {NOW}, lease_deadline = NULL, session_id = NULL, server_id = NULL, "
            "detached_at = NULL FROM d "
            "WHERE t.id = d.id AND t.state = 'leased' AND t.lease_id = d.lease_id "
            "RETURNING t.id, t.workflow, t.stage, t.agent_run_id, t.collection_id, t.priority, "
            "t.output, d.next_stage, d.next_max), "
            "follow AS (INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
            "priority, max_attempts, created_at, ready_at, input, previous_task_id) "
            "SELECT workflow, next_stage, agent_run_id, collection_id, 'ready', priority, "
            f"next_max, {NOW}, {NOW}, output, id FROM done WHERE next_stage IS NOT NULL "
            "ON CONFLICT DO NOTHING RETURNING id, previous_task_id), "
            "counted AS (INSERT INTO task_counts (workflow, stage, state, shard, count) "
            f"SELECT workflow, stage, 'done', {SHARD}, count(*) FROM done GROUP BY workflow, stage "
            "ON CONFLICT (workflow, stage, state, shard) "
            "DO UPDATE SET count = task_counts.count + excluded.count) "
            "SELECT done.id, follow.id, (SELECT pg_notify('agentrun_ready', '') "
            "WHERE EXISTS (SELECT 1 FROM follow)) FROM done "
            "LEFT JOIN follow ON follow.previous_task_id = done.id",
            {
                "ids": [c.task_id for c in plan.done],
                "leases": [c.lease_id for c in plan.done],
                "pathways": [c.pathway for c in plan.done],
                "outputs": [c.output for c in plan.done],
                "next": [stage.name if stage else None for stage in follow],
                "max": [stage.max_attempts if stage else None for stage in follow],
                "now": now,
            },
        )
        next_ids = {row[0]: row[1] for row in await cursor.fetchall()}
    missed = [c.task_id for c in plan.done if c.task_id not in next_ids]
    reread = await settle_rows(conn, missed) if missed else {}
    acks = []
    for item, ack in zip(items, plan.acks, strict=True):
        if ack is not None:
            acks.append(ack)
        elif item.task_id not in next_ids:  # settled elsewhere between our read and write
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
                    next_task_id=next_ids[item.task_id],
                    stage=rows[item.task_id].stage,
                    result="done",
                )
            )
    return acks


async def record_failure(
    conn: Connection,
    task_id: int,
    attempt: int,
    lease_id: str | None,
    error: str,
    now: float | None,
) -> None:
    """Put a failed attempt on record (a redriven task's new attempt replaces its old one)."""
    await conn.execute(
        "INSERT INTO task_failures (task_id, attempt, lease_id, error, failed_at) "
        f"VALUES (%(task)s, %(attempt)s, %(lease)s, %(error)s, {NOW}) "
        "ON CONFLICT (task_id, attempt) DO UPDATE SET lease_id = excluded.lease_id, "
        "error = excluded.error, failed_at = excluded.failed_at",
        {"task": task_id, "attempt": attempt, "lease": lease_id, "error": error, "now": now},
    )


async def end_attempt(
    conn: Connection, row: SettleRow, dead: bool, delay: float, now: float | None
) -> bool:
    """Move a leased task, under its current lease, to dead or back to ready after `delay`
    seconds; whether it moved."""
    if dead:
        sql = (
            f"UPDATE tasks SET state = 'dead', finished_at = {NOW}, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL "
            "WHERE id = %(task)s AND state = 'leased' AND lease_id = %(lease)s RETURNING id"
        )
    else:
        sql = (
            f"UPDATE tasks SET state = 'ready', ready_at = {NOW} + %(delay)s, lease_id = NULL, "
            "lease_deadline = NULL, session_id = NULL, server_id = NULL, detached_at = NULL "
            "WHERE id = %(task)s AND state = 'leased' AND lease_id = %(lease)s RETURNING id"
        )
    cursor = await conn.execute(
        sql, {"task": row.task_id, "lease": row.lease_id, "delay": delay, "now": now}
    )
    if await cursor.fetchone() is None:
        return False
    if dead:
        await conn.execute(
            "INSERT INTO task_counts (workflow, stage, state, shard, count) "
            f"VALUES (%s, %s, 'dead', {SHARD}, 1) ON CONFLICT (workflow, stage, state, shard) "
            "DO UPDATE SET count = task_counts.count + 1",
            (row.workflow, row.stage),
        )
    return True


def _stage_of(definitions: dict[str, Any], row: SettleRow) -> StageDef:
    try:
        stage: StageDef = definitions[row.workflow].stage(row.stage)
        return stage
    except (KeyError, NotFound):
        return StageDef(row.stage)  # a newer definition dropped it: the defaults


async def fail(
    conn: Connection,
    workflows: WorkflowCache,
    items: Sequence[Failure],
    now: float | None,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.fail`; runs inside the caller's transaction."""
    acks = []
    for item in items:
        row = await settle_row(conn, item.task_id, item.lease_id)
        if row is None or not rules.is_current(row, item.lease_id, holder):
            acks.append(rules.answer_miss("fail", item.task_id, item.lease_id, row, "", holder))
            continue
        definitions = await workflows.many(conn, {row.workflow})
        dead, delay = rules.failure_outcome(row, item, _stage_of(definitions, row))
        if not await end_attempt(conn, row, dead, delay, now):
            row = await settle_row(conn, item.task_id, item.lease_id)
            acks.append(rules.answer_miss("fail", item.task_id, item.lease_id, row))
            continue
        await record_failure(conn, item.task_id, row.attempt, item.lease_id, item.error, now)
        if not dead and delay <= 0:
            await notify_ready(conn, row.workflow)
        acks.append(
            Ack(item.task_id, item.lease_id, stage=row.stage, result="dead" if dead else "retry")
        )
    return acks


async def extend(
    conn: Connection,
    workflows: WorkflowCache,
    items: Sequence[Extension],
    now: float | None,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.extend`; runs inside the caller's transaction."""
    acks = []
    rows = await settle_rows(conn, [item.task_id for item in items])
    definitions = await workflows.many(conn, {row.workflow for row in rows.values()})
    for item in items:
        row = rows.get(item.task_id)
        if row is None or not rules.is_current(row, item.lease_id, holder):
            acks.append(rules.settle_error(item.task_id, item.lease_id, row, holder))
            continue
        seconds = item.lease_seconds
        if seconds is None:
            seconds = _stage_of(definitions, row).lease_seconds
        cursor = await conn.execute(
            f"UPDATE tasks SET lease_deadline = {NOW} + %(seconds)s WHERE id = %(task)s "
            "AND state = 'leased' AND lease_id = %(lease)s RETURNING lease_deadline",
            {"seconds": seconds, "task": item.task_id, "lease": item.lease_id, "now": now},
        )
        moved = await cursor.fetchone()
        if moved is None:
            row = await settle_row(conn, item.task_id, item.lease_id)
            acks.append(rules.settle_error(item.task_id, item.lease_id, row))
            continue
        acks.append(
            Ack(item.task_id, item.lease_id, deadline=moved[0], stage=row.stage, result="extended")
        )
    return acks


async def release(
    conn: Connection, items: Sequence[Release], now: float | None, holder: str = ""
) -> list[Ack]:
    """See `Storage.release`; runs inside the caller's transaction. The lease id stays on the
    ready task until it is leased again, so a repeated release is recognised."""
    acks = []
    workflows: set[str] = set()
    for item in items:
        cursor = await conn.execute(
            "UPDATE tasks SET state = 'ready', attempt = attempt - 1, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL, ready_at = CASE "
            f"WHEN %(delay)s > 0 THEN {NOW} + %(delay)s ELSE ready_at END "
            "WHERE id = %(task)s AND state = 'leased' AND lease_id = %(lease)s "
            "AND (%(holder)s = '' OR session_id IS NULL OR session_id = %(holder)s) "
            "RETURNING stage, workflow",
            {
                "delay": item.delay_seconds,
                "task": item.task_id,
                "lease": item.lease_id,
                "holder": holder,
                "now": now,
            },
        )
        moved = await cursor.fetchone()
        if moved is None:
            row = await settle_row(conn, item.task_id, item.lease_id)
            acks.append(rules.answer_miss("release", item.task_id, item.lease_id, row, "", holder))
            continue
        workflows.add(moved[1])
        acks.append(Ack(item.task_id, item.lease_id, stage=moved[0], result="released"))
    for workflow in workflows:
        await notify_ready(conn, workflow)
    return acks
