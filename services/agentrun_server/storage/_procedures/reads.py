"""Reads of tasks: the backlog (never visiting a finished task), one task, pages of tasks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from agentrun_server._errors import NotFound
from agentrun_server.storage._procedures.workflows import WorkflowCache
from agentrun_server.storage._rules import take_within
from agentrun_server.storage._statements import Statements, TaskFilter
from agentrun_server.storage._types import Page, StageBacklog, TaskRecord, TaskState

T = TypeVar("T")


async def backlog(
    db: Statements, workflows: WorkflowCache, workflow_name: str, now: float
) -> list[StageBacklog]:
    """See `Storage.backlog`: ended tasks from their kept counts; ready and leased ones off
    their index ranges."""
    names = [workflow_name] if workflow_name else await db.workflow_names()
    result = []
    for name in names:
        workflow = await workflows.get(db, name)
        counts: dict[str, dict[str, Any]] = {s.name: {} for s in workflow.stages}
        for stage, state, n in await db.ended_counts(name):
            counts.setdefault(stage, {})[state] = n
        # Stages that tasks still name although the definition dropped them are counted too.
        for active in await db.active_counts(name, list(counts), now):
            c = counts[active.stage]
            c["ready"] = active.ready - active.scheduled
            c["scheduled"] = active.scheduled
            c["leased"] = active.leased
            c["oldest_ready_age_seconds"] = max(0.0, active.oldest_ready_age_seconds or 0.0)
        result += [StageBacklog(name, stage, **c) for stage, c in counts.items()]
    return result


async def has_active(db: Statements, workflow: str, stages: Sequence[str]) -> bool:
    """See `Storage.has_active`."""
    return await db.has_active(workflow, list(stages))


async def get_task(db: Statements, task_id: int) -> TaskRecord:
    """See `Storage.get_task`."""
    task = await db.task(task_id)
    if task is None:
        raise NotFound(f"no task with id {task_id}")
    return task


async def list_tasks(
    db: Statements,
    workflow: str,
    stage: str,
    state: TaskState | None,
    after_id: int,
    limit: int,
    max_bytes: int | None,
    agent_run_id: str = "",
) -> Page[TaskRecord]:
    """See `Storage.list_tasks`. Sizes are read first, so only the tasks returned are read whole.
    Each read sees the database as it is then (PostgreSQL's READ COMMITTED): tasks listed by size
    may have left the state asked for before they are read. A page is empty only at the end, so
    when all of them left, the listing reads on past them."""
    where = TaskFilter(workflow, stage, state, agent_run_id)
    return await sized_page(
        lambda after: db.task_sizes(where, after, limit + 1),
        lambda after, last: db.tasks_through(where, after, last),
        after_id,
        limit,
        max_bytes,
    )


async def sized_page(
    sizes: Callable[[int], Awaitable[list[tuple[int, int]]]],
    through: Callable[[int, int], Awaitable[list[T]]],
    after: int,
    limit: int,
    max_bytes: int | None,
) -> Page[T]:
    """A page of a listing read in two steps: `sizes(after)` gives (position, encoded size) of
    up to `limit + 1` items after `after`; the page keeps those within `limit` and `max_bytes`
    (the first always), and `through(after, last)` reads them whole. The items listed may have
    left the listing before they are read: a page is empty only at the end, so when all of them
    left, the listing reads on past them."""
    while True:
        listed = await sizes(after)
        kept, more = take_within([size for _, size in listed], limit, max_bytes)
        if not kept:
            return Page([], False)
        last = listed[kept - 1][0]
        page = await through(after, last)
        if page or not more:
            return Page(page, more)
        after = last
