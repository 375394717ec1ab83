"""Workflow definitions, and the cache that keeps them parsed."""

from __future__ import annotations

import contextlib
import threading

from agentrun_server._errors import FailedPrecondition, NotFound, Unavailable
from agentrun_server.storage._procedures import leases  # (imports this module: used at call time)
from agentrun_server.storage._statements import Statements, TaskSelection
from agentrun_server.storage._types import WorkflowDef, WorkflowPut


class WorkflowCache:
    """Parsed definitions by name, shared by every connection of one store (and, on SQLite, the
    threads using them). A definition is read again only when its stored version changed
    (another process may have applied a new one): each lookup costs one indexed read."""

    def __init__(self) -> None:
        self._parsed: dict[str, WorkflowDef] = {}
        self._lock = threading.Lock()

    async def get(self, db: Statements, name: str) -> WorkflowDef:
        """The current definition of `name`.

        Raises:
            NotFound: no such workflow.
        """
        version = await db.workflow_version(name)
        if version is None:
            raise NotFound(f"no workflow named {name!r}")
        cached = self._parsed.get(name)
        if cached is not None and cached.version == version:
            return cached
        parsed = await db.workflow(name)
        if parsed is None:  # deleted between the two reads (only by hand: we never delete)
            raise NotFound(f"no workflow named {name!r}")
        with self._lock:
            current = self._parsed.get(name)
            if current is None or current.version < parsed.version:
                self._parsed[name] = parsed
        return parsed

    async def many(self, db: Statements, names: set[str]) -> dict[str, WorkflowDef]:
        """The current definitions of `names`, by name."""
        return {name: await self.get(db, name) for name in names}


async def put_workflow(
    db: Statements, workflows: WorkflowCache, workflow: WorkflowDef, now: float, force: bool
) -> WorkflowPut:
    """See `Storage.put_workflow`. The stored row is locked while the new definition is checked,
    and the write is guarded by the version read: one applied meanwhile is never overwritten."""
    definition = workflow.to_json()
    stored = await db.workflow_to_change(workflow.name)
    if stored is not None and stored[1] == definition:
        return WorkflowPut(await workflows.get(db, workflow.name), False)
    active = await db.stages_holding_tasks(workflow.name, [s.name for s in workflow.stages])
    cancelled = None
    if active and not force:
        held = ", ".join(f"{stage!r} ({n})" for stage, n in active)
        raise FailedPrecondition(
            f"workflow {workflow.name!r}: the new definition drops stages that still hold "
            f"ready or leased tasks: {held}; apply with force (agentrun workflow apply --force) "
            "to cancel them, or let them finish first"
        )
    if active:
        selection = TaskSelection((), workflow.name, [stage for stage, _ in active])
        cancelled = await leases.cancel_selected(db, selection, now)
    version = 1 if stored is None else stored[0] + 1
    if not await db.store_workflow(workflow.name, version, definition, now):
        raise Unavailable(f"workflow {workflow.name!r} was changed meanwhile; apply it again")
    return WorkflowPut(await workflows.get(db, workflow.name), True, cancelled)


async def list_workflows(db: Statements, workflows: WorkflowCache) -> list[WorkflowDef]:
    """See `Storage.list_workflows`."""
    return [await workflows.get(db, name) for name in await db.workflow_names()]


async def stages_of(db: Statements, workflows: WorkflowCache, workflow: str) -> list[str]:
    """Every stage that may hold tasks of `workflow`: its definition's, and any stage its ended
    tasks are counted in (a newer definition may have dropped it)."""
    names: dict[str, None] = {}
    with contextlib.suppress(NotFound):  # no definition: the counted stages alone
        names.update((s.name, None) for s in (await workflows.get(db, workflow)).stages)
    names.update((stage, None) for stage in await db.counted_stages(workflow))
    return list(names)
