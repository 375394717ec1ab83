"""Statements on workflow definitions, and the cache that keeps them parsed."""

from __future__ import annotations

import sqlite3
import threading

from agentrun_server._errors import FailedPrecondition, NotFound, Unavailable
from agentrun_server.storage._types import WorkflowDef
from agentrun_server.storage.sqlite._engine import transaction


class WorkflowCache:
    """Parsed definitions by name, shared by every connection of one store.

    A definition is re-read only when its stored version changed (another process may have
    applied a new one): each lookup costs one indexed read of the version.
    """

    def __init__(self) -> None:
        self._parsed: dict[str, WorkflowDef] = {}
        self._lock = threading.Lock()

    def get(self, db: sqlite3.Connection, name: str) -> WorkflowDef:
        """The current definition of `name`.

        Raises:
            NotFound: no such workflow.
        """
        row = db.execute("SELECT version FROM workflows WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no workflow named {name!r}")
        cached = self._parsed.get(name)
        if cached is not None and cached.version == row[0]:
            return cached
        found = db.execute(
            "SELECT version, definition, updated_at FROM workflows WHERE name = ?", (name,)
        ).fetchone()
        if found is None:  # deleted between the two reads (only by hand: we never delete)
            raise NotFound(f"no workflow named {name!r}")
        parsed = WorkflowDef.from_json(name, found[1], found[0], found[2])
        with self._lock:
            current = self._parsed.get(name)
            if current is None or current.version < parsed.version:
                self._parsed[name] = parsed
        return parsed


def put_workflow(
    db: sqlite3.Connection, workflows: WorkflowCache, workflow: WorkflowDef, now: float
) -> tuple[WorkflowDef, bool]:
    """See `Storage.put_workflow`."""
    definition = workflow.to_json()
    with transaction(db):
        row = db.execute(
            "SELECT version, definition FROM workflows WHERE name = ?", (workflow.name,)
        ).fetchone()
        if row is not None and row[1] == definition:
            return workflows.get(db, workflow.name), False
        kept = [s.name for s in workflow.stages]
        active = db.execute(
            "SELECT stage, COUNT(*) FROM tasks WHERE workflow = ? AND state IN "
            f"('ready', 'leased') AND stage NOT IN ({','.join('?' * len(kept))}) "
            "GROUP BY stage",
            (workflow.name, *kept),
        ).fetchall()
        if active:
            held = ", ".join(f"{stage!r} ({n})" for stage, n in active)
            raise FailedPrecondition(
                f"workflow {workflow.name!r}: the new definition drops stages that still hold "
                f"ready or leased tasks: {held}"
            )
        # Guarded by the version read above: a definition applied meanwhile is not overwritten.
        version = 1 if row is None else row[0] + 1
        stored = db.execute(
            "INSERT INTO workflows (name, version, definition, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
            "definition = excluded.definition, updated_at = excluded.updated_at "
            "WHERE workflows.version = ? RETURNING version",
            (workflow.name, version, definition, now, version - 1),
        ).fetchone()
        if stored is None:
            raise Unavailable(f"workflow {workflow.name!r} was changed meanwhile; apply it again")
        return workflows.get(db, workflow.name), True


def get_workflow(db: sqlite3.Connection, workflows: WorkflowCache, name: str) -> WorkflowDef:
    """See `Storage.get_workflow`."""
    return workflows.get(db, name)


def list_workflows(db: sqlite3.Connection, workflows: WorkflowCache) -> list[WorkflowDef]:
    """See `Storage.list_workflows`."""
    names = [r[0] for r in db.execute("SELECT name FROM workflows ORDER BY name")]
    return [workflows.get(db, name) for name in names]
