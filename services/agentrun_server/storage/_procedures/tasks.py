"""Tasks: enqueue, claim, and the settles (complete, fail, extend, release).

Every state change is one guarded statement: a claim moves only tasks still ready, a settle only a
task still leased under the lease presented (the fencing token), and each says what moved. What
a settle means (routing, retry or dead, repeats, who may settle) is decided by `storage._rules`.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

from agentrun_server._errors import NotFound
from agentrun_server.storage import _rules as rules
from agentrun_server.storage._procedures.workflows import WorkflowCache
from agentrun_server.storage._statements import NewLease, Statements
from agentrun_server.storage._types import (
    Ack,
    AckCode,
    AckResult,
    ClaimRequest,
    Completion,
    Enqueued,
    Extension,
    Failure,
    LeasedTask,
    Release,
    SettledAndLeased,
    StageDef,
    WorkflowDef,
)

LEASE_ID_BYTES = 12


async def enqueue(
    db: Statements,
    workflows: WorkflowCache,
    workflow_name: str,
    stage_name: str,
    run_ids: Sequence[str],
    priority: int,
    now: float,
) -> Enqueued:
    """See `Storage.enqueue`. The unique index on a run's ready or leased task in a workflow
    decides what is skipped: nothing is checked first."""
    workflow = await workflows.get(db, workflow_name)
    stage = workflow.stage(stage_name) if stage_name else workflow.first_stage
    unique = list(dict.fromkeys(run_ids))
    collections = await db.run_collections(unique)
    for run_id in unique:
        if run_id not in collections:
            raise NotFound(f"no agent run with id {run_id!r}")
    runs = [(run_id, collections[run_id]) for run_id in unique]
    enqueued = await db.enter_tasks(workflow.name, stage, runs, priority, now)
    if enqueued:
        await db.notify_ready(workflow.name)
    return Enqueued(enqueued, len(unique) - enqueued)


async def claim(
    db: Statements, workflows: WorkflowCache, request: ClaimRequest, now: float
) -> list[LeasedTask]:
    """See `Storage.claim`."""
    stages = [s for s, n in request.stage_limits.items() if n > 0]
    if request.limit <= 0 or not stages:
        return []
    workflow = await workflows.get(db, request.workflow)
    limits = {s: min(request.limit, request.stage_limits[s]) for s in stages}
    candidates = await db.claim_candidates(workflow.name, limits, now)
    if not candidates:
        return []
    chosen = rules.choose_claims(candidates, request.limit, request.max_bytes)
    seconds = {s: request.lease_seconds or workflow.stage(s).lease_seconds for s in stages}
    # Fresh lease ids (the fencing tokens), 96 random bits each, drawn in one call: one draw
    # per task cost 4 % of the hot path.
    ids = secrets.token_hex(LEASE_ID_BYTES * len(chosen))
    width = 2 * LEASE_ID_BYTES
    leases = [
        NewLease(c.task_id, ids[i * width : (i + 1) * width], seconds[c.stage])
        for i, c in enumerate(chosen)
    ]
    leased = await db.lease_tasks(leases, request.holder, request.server_id, now)
    leased.sort(key=lambda t: (-t.priority, t.created_at, t.task_id))
    return leased


async def complete(
    db: Statements,
    workflows: WorkflowCache,
    items: Sequence[Completion],
    now: float,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.complete`. Set-based: one read of every task named, then one write of all
    the completions and the next stages' tasks."""
    rows = await db.settle_rows([item.task_id for item in items])
    definitions = await workflows.many(db, {row.workflow for row in rows.values()})
    plan = rules.plan_completions(items, rows, definitions.__getitem__, holder)
    moved = await db.complete_tasks(plan.done, rows, plan.follow, now) if plan.done else {}
    missed = [c.task_id for c in plan.done if c.task_id not in moved]
    reread = await db.settle_rows(missed) if missed else {}
    acks = []
    for item, ack in zip(items, plan.acks, strict=True):
        if ack is not None:
            acks.append(ack)
        elif item.task_id not in moved:  # settled elsewhere between our read and our write
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
                    next_task_id=moved[item.task_id],
                    stage=rows[item.task_id].stage,
                    result=AckResult.DONE,
                )
            )
    # A repeat is answered as the first was: with the task the completion made.
    repeats = [i for i, ack in enumerate(acks) if ack.result is AckResult.REPEAT]
    if repeats:
        made = await db.successors([acks[i].task_id for i in repeats])
        for i in repeats:
            acks[i] = acks[i]._replace(next_task_id=made.get(acks[i].task_id))
    return acks


async def complete_and_claim(
    db: Statements,
    workflows: WorkflowCache,
    items: Sequence[Completion],
    request: ClaimRequest,
    now: float,
) -> SettledAndLeased:
    """See `Storage.complete_and_claim`: a completion refused for its pathway keeps its lease,
    and so its credit."""
    acks = await complete(db, workflows, items, now, request.session_id)
    kept = sum(1 for ack in acks if ack.code == AckCode.INVALID_ARGUMENT)
    if kept:
        request = dataclasses.replace(request, limit=request.limit - kept)
    return SettledAndLeased(acks, await claim(db, workflows, request, now))


def _stage_of(definitions: dict[str, WorkflowDef], row: rules.SettleRow) -> StageDef:
    """The task's stage policy (the defaults if a newer definition dropped the stage)."""
    try:
        return definitions[row.workflow].stage(row.stage)
    except (KeyError, NotFound):
        return StageDef(row.stage)


async def fail(
    db: Statements,
    workflows: WorkflowCache,
    items: Sequence[Failure],
    now: float,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.fail`."""
    acks = []
    for item in items:
        row = await db.settle_row(item.task_id, item.lease_id)
        if row is None or not rules.is_current(row, item.lease_id, holder):
            acks.append(rules.answer_miss("fail", item.task_id, item.lease_id, row, "", holder))
            continue
        definitions = await workflows.many(db, {row.workflow})
        dead, delay = rules.failure_outcome(row, item, _stage_of(definitions, row))
        if not await db.end_attempt(row, dead, delay, now):
            row = await db.settle_row(item.task_id, item.lease_id)
            acks.append(rules.answer_miss("fail", item.task_id, item.lease_id, row))
            continue
        await db.record_failure(item.task_id, row.attempt, item.lease_id, item.error, now)
        if not dead and delay <= 0:
            await db.notify_ready(row.workflow)
        result = AckResult.DEAD if dead else AckResult.RETRY
        acks.append(Ack(item.task_id, item.lease_id, stage=row.stage, result=result))
    return acks


async def extend(
    db: Statements,
    workflows: WorkflowCache,
    items: Sequence[Extension],
    now: float,
    holder: str = "",
) -> list[Ack]:
    """See `Storage.extend`."""
    acks = []
    rows = await db.settle_rows([item.task_id for item in items])
    definitions = await workflows.many(db, {row.workflow for row in rows.values()})
    for item in items:
        row = rows.get(item.task_id)
        if row is None or not rules.is_current(row, item.lease_id, holder):
            acks.append(rules.settle_error(item.task_id, item.lease_id, row, holder))
            continue
        seconds = item.lease_seconds
        if seconds is None:
            seconds = _stage_of(definitions, row).lease_seconds
        deadline = await db.extend_lease(item.task_id, item.lease_id, seconds, now)
        if deadline is None:
            row = await db.settle_row(item.task_id, item.lease_id)
            acks.append(rules.settle_error(item.task_id, item.lease_id, row))
            continue
        acks.append(
            Ack(
                item.task_id,
                item.lease_id,
                deadline=deadline,
                stage=row.stage,
                result=AckResult.EXTENDED,
            )
        )
    return acks


async def release(
    db: Statements, items: Sequence[Release], now: float, holder: str = ""
) -> list[Ack]:
    """See `Storage.release`. The lease id stays on the ready task until it is leased again, so
    a repeated release is recognised."""
    acks = []
    workflows: set[str] = set()
    for item in items:
        moved = await db.release_lease(item, holder, now)
        if moved is None:
            row = await db.settle_row(item.task_id, item.lease_id)
            acks.append(rules.answer_miss("release", item.task_id, item.lease_id, row, "", holder))
            continue
        workflows.add(moved[0])
        acks.append(Ack(item.task_id, item.lease_id, stage=moved[1], result=AckResult.RELEASED))
    for workflow in workflows:
        await db.notify_ready(workflow)
    return acks
