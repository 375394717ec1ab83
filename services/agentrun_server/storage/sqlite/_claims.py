"""Statements that create tasks and lease them: enqueue and claim."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from agentrun_server._errors import NotFound
from agentrun_server.storage._rules import Candidate, choose_claims
from agentrun_server.storage._types import ClaimRequest, LeasedTask
from agentrun_server.storage.sqlite._engine import select_in, transaction
from agentrun_server.storage.sqlite._workflows import WorkflowCache

_INSERT_ROWS = 1000  # rows per multi-row VALUES list, far under SQLite's parameter limit


def enqueue(
    db: sqlite3.Connection,
    workflows: WorkflowCache,
    workflow_name: str,
    stage_name: str,
    run_ids: Sequence[str],
    priority: int,
    now: float,
) -> tuple[int, int]:
    """See `Storage.enqueue`. The unique index on a run's ready or leased task in a workflow
    decides what is skipped (`ON CONFLICT DO NOTHING`): nothing is checked first."""
    with transaction(db):
        workflow = workflows.get(db, workflow_name)
        stage = workflow.stage(stage_name) if stage_name else workflow.first_stage
        unique = list(dict.fromkeys(run_ids))
        collections: dict[str, str] = dict(
            select_in(db, "SELECT id, collection_id FROM agent_runs WHERE id IN ({ids})", unique)
        )
        for run_id in unique:
            if run_id not in collections:
                raise NotFound(f"no agent run with id {run_id!r}")
        enqueued = 0
        for start in range(0, len(unique), _INSERT_ROWS):
            batch = unique[start : start + _INSERT_ROWS]
            values: list[Any] = []
            for run_id in batch:
                values += (run_id, collections[run_id])
            enqueued += len(
                db.execute(
                    "WITH r (id, collection_id) AS (VALUES "
                    + ", ".join(["(?, ?)"] * len(batch))
                    + ") INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
                    "priority, max_attempts, created_at, ready_at) SELECT ?, ?, r.id, "
                    "r.collection_id, 'ready', ?, ?, ?, ? FROM r WHERE true "
                    "ON CONFLICT DO NOTHING RETURNING id",
                    [*values, workflow.name, stage.name, priority, stage.max_attempts, now, now],
                ).fetchall()
            )
        return enqueued, len(unique) - enqueued


def claim(
    db: sqlite3.Connection, workflows: WorkflowCache, request: ClaimRequest, now: float
) -> list[LeasedTask]:
    """See `Storage.claim`; runs inside the caller's transaction."""
    stages = [s for s, n in request.stage_limits.items() if n > 0]
    if request.limit <= 0 or not stages:
        return []
    workflow = workflows.get(db, request.workflow)
    # Each stage's first ready tasks in dispatch order, read off its own range of the
    # tasks_ready index (a query over several stages at once would sort them all), then merged.
    per_stage = (
        "SELECT * FROM (SELECT priority, ready_at, id, stage, coalesce(length(input), 0) + "
        "(SELECT size_bytes FROM agent_runs r WHERE r.id = tasks.agent_run_id) FROM tasks "
        "WHERE state = 'ready' AND workflow = ? AND stage = ? AND ready_at <= ? "
        "ORDER BY priority DESC, ready_at, id LIMIT ?)"
    )
    rows = db.execute(
        " UNION ALL ".join([per_stage] * len(stages)),
        [
            value
            for stage in stages
            for value in (
                workflow.name,
                stage,
                now,
                min(request.limit, request.stage_limits[stage]),
            )
        ],
    ).fetchall()
    if not rows:
        return []
    chosen = choose_claims([Candidate._make(row) for row in rows], request.limit, request.max_bytes)
    seconds = {
        stage: request.lease_seconds or workflow.stage(stage).lease_seconds for stage in stages
    }
    leased: list[tuple[Any, ...]] = []
    for start in range(0, len(chosen), _INSERT_ROWS):  # SQLite caps parameters per statement
        batch = chosen[start : start + _INSERT_ROWS]
        # Guarded: only a task still ready moves (RETURNING what did).
        leased += db.execute(
            "WITH c (id, seconds) AS (VALUES "
            + ", ".join(["(?, ?)"] * len(batch))
            + ") UPDATE tasks SET state = 'leased', attempt = attempt + 1, "
            "lease_id = lower(hex(randomblob(12))), session_id = ?, server_id = ?, "
            "detached_at = NULL, lease_deadline = ? + c.seconds FROM c "
            "WHERE tasks.id = c.id AND tasks.state = 'ready' AND tasks.ready_at <= ? "
            "RETURNING tasks.id, lease_id, attempt, max_attempts, lease_deadline, stage, "
            "agent_run_id, collection_id, priority, input, created_at",
            [
                *(value for c in batch for value in (c.task_id, seconds[c.stage])),
                request.session_id,
                request.server_id or None,
                now,
                now,
            ],
        ).fetchall()
    data: dict[str, bytes] = dict(
        select_in(
            db,
            "SELECT id, data FROM agent_runs WHERE id IN ({ids})",
            list({row[6] for row in leased}),
        )
    )
    leased.sort(key=lambda row: (-row[8], row[10], row[0]))
    return [LeasedTask._make((*row, data[row[6]])) for row in leased]
