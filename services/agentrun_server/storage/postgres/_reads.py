"""Reads of tasks: the backlog (never visiting a finished task), one task, pages of tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentrun_server._errors import NotFound
from agentrun_server.storage._rules import take_within
from agentrun_server.storage._types import (
    AttemptFailureRecord,
    StageBacklog,
    TaskRecord,
    TaskState,
)
from agentrun_server.storage.postgres._engine import NOW, Connection
from agentrun_server.storage.postgres._runs import WorkflowCache

_TASK_COLUMNS = (
    "id, workflow, stage, agent_run_id, collection_id, state, attempt, max_attempts, priority, "
    "created_at, ready_at, lease_deadline, pathway, output, input, previous_task_id"
)


async def backlog(
    conn: Connection, workflows: WorkflowCache, workflow_name: str, now: float | None
) -> list[StageBacklog]:
    """See `Storage.backlog`: ended tasks from their kept counts (summed over shards); ready and
    leased ones off their index ranges."""
    if workflow_name:
        names = [workflow_name]
    else:
        cursor = await conn.execute("SELECT name FROM workflows ORDER BY name")
        names = [row[0] for row in await cursor.fetchall()]
    result = []
    for name in names:
        workflow = await workflows.get(conn, name)
        counts: dict[str, dict[str, Any]] = {s.name: {} for s in workflow.stages}
        cursor = await conn.execute(
            "SELECT stage, state, sum(count) FROM task_counts WHERE workflow = %s "
            "GROUP BY stage, state",
            (name,),
        )
        for stage, state, n in await cursor.fetchall():
            counts.setdefault(stage, {})[state] = int(n)
        cursor = await conn.execute(
            "SELECT s.stage, r.ready, r.scheduled, r.oldest_age, l.leased "
            "FROM unnest(%(stages)s::text[]) AS s(stage) "
            "CROSS JOIN LATERAL (SELECT count(*) AS ready, "
            f"count(*) FILTER (WHERE ready_at > {NOW}) AS scheduled, "
            f"{NOW} - min(ready_at) FILTER (WHERE ready_at <= {NOW}) AS oldest_age FROM tasks "
            "WHERE state = 'ready' AND workflow = %(workflow)s AND stage = s.stage) AS r "
            "CROSS JOIN LATERAL (SELECT count(*) AS leased FROM tasks "
            "WHERE state = 'leased' AND workflow = %(workflow)s AND stage = s.stage) AS l",
            {"stages": list(counts), "workflow": name, "now": now},
        )
        for stage, ready, scheduled, oldest_age, leased in await cursor.fetchall():
            c = counts[stage]
            c["ready"] = ready - scheduled
            c["scheduled"] = scheduled
            c["leased"] = leased
            c["oldest_ready_age_seconds"] = max(0.0, float(oldest_age or 0.0))
        result += [StageBacklog(name, stage, **c) for stage, c in counts.items()]
    return result


async def has_active(conn: Connection, workflow: str, stages: Sequence[str]) -> bool:
    """See `Storage.has_active`."""
    cursor = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM tasks WHERE state = 'ready' AND workflow = %(w)s "
        "AND stage = ANY(%(s)s)) OR EXISTS (SELECT 1 FROM tasks WHERE state = 'leased' "
        "AND workflow = %(w)s AND stage = ANY(%(s)s))",
        {"w": workflow, "s": list(stages)},
    )
    row = await cursor.fetchone()
    return bool(row and row[0])


async def _tasks(conn: Connection, rows: list[tuple[Any, ...]]) -> list[TaskRecord]:
    failures: dict[int, list[AttemptFailureRecord]] = {row[0]: [] for row in rows}
    if rows:
        cursor = await conn.execute(
            "SELECT task_id, attempt, error, failed_at FROM task_failures "
            "WHERE task_id = ANY(%s) ORDER BY task_id, attempt",
            (list(failures),),
        )
        for task_id, *failure in await cursor.fetchall():
            failures[task_id].append(AttemptFailureRecord(*failure))
    records = []
    for row in rows:
        fields = [*row[:5], TaskState(row[5]), *row[6:], tuple(failures[row[0]])]
        records.append(TaskRecord(*fields))
    return records


async def get_task(conn: Connection, task_id: int) -> TaskRecord:
    """See `Storage.get_task`."""
    cursor = await conn.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = %s", (task_id,))
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"no task with id {task_id}")
    (task,) = await _tasks(conn, [row])
    return task


async def list_tasks(
    conn: Connection,
    workflow: str,
    stage: str,
    state: TaskState | None,
    after_id: int,
    limit: int,
    max_bytes: int | None,
) -> tuple[list[TaskRecord], bool]:
    """See `Storage.list_tasks`. Sizes are read first, so only the tasks returned are read whole."""
    where, params = ["id > %(after)s"], {"after": after_id, "limit": limit + 1}
    for column, value in (("workflow", workflow), ("stage", stage)):
        if value:
            where.append(f"{column} = %({column})s")
            params[column] = value  # type: ignore[assignment]
    if state is not None:
        where.append("state = %(state)s")
        params["state"] = state.value  # type: ignore[assignment]
    condition = " AND ".join(where)
    cursor = await conn.execute(
        "SELECT id, coalesce(length(input), 0) + coalesce(length(output), 0) FROM tasks "
        f"WHERE {condition} ORDER BY id LIMIT %(limit)s",
        params,
    )
    sizes = await cursor.fetchall()
    kept, more = take_within([size for _, size in sizes], limit, max_bytes)
    if not kept:
        return [], False
    cursor = await conn.execute(
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE {condition} AND id <= %(last)s ORDER BY id",
        {**params, "last": sizes[kept - 1][0]},
    )
    return await _tasks(conn, await cursor.fetchall()), more
