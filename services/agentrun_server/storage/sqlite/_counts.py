"""Task counts per stage: kept as tasks end (done, dead, cancelled), read for the backlog.

The tasks table keeps every finished task; counting them at each scrape grew with history (230 ms
at 100,000 tasks, stalling dispatch). Ended tasks are counted in `task_counts` by the statements
that move them, a statement per stage and batch; ready and leased tasks are counted off their own
index ranges, so a backlog read never visits a finished task.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from typing import Any

from agentrun_server.storage._types import StageBacklog
from agentrun_server.storage.sqlite._workflows import WorkflowCache

CountKey = tuple[str, str, str]
"""(workflow, stage, state)."""


def add_counts(db: sqlite3.Connection, deltas: Counter[CountKey]) -> None:
    """Add `deltas` to the kept counts (inside the transaction that moved the tasks)."""
    changed = [(*key, n) for key, n in deltas.items() if n]
    if changed:
        db.executemany(
            "INSERT INTO task_counts (workflow, stage, state, count) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET count = count + excluded.count",
            changed,
        )


def backlog(
    db: sqlite3.Connection, workflows: WorkflowCache, workflow_name: str, now: float
) -> list[StageBacklog]:
    """See `Storage.backlog`."""
    names = (
        [workflow_name]
        if workflow_name
        else [r[0] for r in db.execute("SELECT name FROM workflows ORDER BY name")]
    )
    result = []
    for name in names:
        workflow = workflows.get(db, name)
        counts: dict[str, dict[str, Any]] = {s.name: {} for s in workflow.stages}
        for stage, state, n in db.execute(
            "SELECT stage, state, count FROM task_counts WHERE workflow = ?", (name,)
        ):
            counts.setdefault(stage, {})[state] = n
        # Stages that tasks still name although the definition dropped them are counted too.
        stages = list(counts)
        for stage in stages:
            ready, scheduled, oldest = db.execute(
                "SELECT COUNT(*), SUM(ready_at > ?), MIN(CASE WHEN ready_at <= ? THEN ready_at END) "
                "FROM tasks WHERE state = 'ready' AND workflow = ? AND stage = ?",
                (now, now, name, stage),
            ).fetchone()
            (leased,) = db.execute(
                "SELECT COUNT(*) FROM tasks WHERE workflow = ? AND stage = ? AND state = 'leased'",
                (name, stage),
            ).fetchone()
            c = counts[stage]
            c["ready"] = ready - (scheduled or 0)
            c["scheduled"] = scheduled or 0
            c["leased"] = leased
            c["oldest_ready_age_seconds"] = max(0.0, now - oldest) if oldest is not None else 0.0
        result += [StageBacklog(name, stage, **c) for stage, c in counts.items()]
    return result


def has_active(db: sqlite3.Connection, workflow: str, stages: list[str]) -> bool:
    """See `Storage.has_active`."""
    for stage in stages:
        for state in ("ready", "leased"):
            if db.execute(
                "SELECT 1 FROM tasks WHERE workflow = ? AND stage = ? AND state = ? LIMIT 1",
                (workflow, stage, state),
            ).fetchone():
                return True
    return False
