"""Leases as a whole: streams that end, workers that resume, servers' heartbeats, expiry and
recovery, cancel and redrive.

A lease belongs to its lease id, not to a stream: a stream that ends without handing its leases
back detaches them (`detach_session`), a worker that reconnects resumes them (`resume`), and the
sweep ends those nobody resumed within the grace, the leases of servers gone silent as much as
those of closed streams. The sweep runs in every process at once: what it ends is locked as it is
chosen (skipping what another holds) and every change is guarded, so each lease ends once.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentrun_server._errors import InvalidArgument
from agentrun_server.storage import _rules as rules
from agentrun_server.storage._procedures.workflows import WorkflowCache, stages_of
from agentrun_server.storage._statements import LeaseEnd, Statements, TaskSelection
from agentrun_server.storage._types import (
    Ack,
    AckResult,
    Cancelled,
    EndedLease,
    LeaseHolder,
    LeaseRef,
    RevocationPage,
    Swept,
)

REVOCATIONS_KEPT_SECONDS = 60.0
"""How long a revocation stays readable for the process serving its stream."""


async def _end(
    db: Statements, rows: Sequence[rules.SettleRow], why: str, now: float
) -> list[EndedLease]:
    """End leases unsettled: the attempt counts; ready again, or dead when spent."""
    if not rows:
        return []
    ends = [LeaseEnd(row, rules.lease_end_is_dead(row.attempt, row.max_attempts)) for row in rows]
    moved = await db.end_leases(ends, why, now)
    ended = [
        EndedLease(row.task_id, row.lease_id or "", row.session_id, row.workflow, row.stage, dead)
        for row, dead in ends
        if row.task_id in moved
    ]
    for workflow in {e.workflow for e in ended if not e.dead}:
        await db.notify_ready(workflow)
    return ended


async def _revoke(db: Statements, leases: Sequence[EndedLease], reason: str, now: float) -> None:
    """Record revocations of the leases a live stream held, for its process to pass on."""
    live = [e for e in leases if e.session_id]
    if live:
        await db.record_revocations(live, reason, now)
        await db.notify_revoked()


async def end_session_leases(db: Statements, session_id: str, now: float) -> list[EndedLease]:
    """See `Storage.end_session_leases`."""
    return await _end(db, await db.session_leases(session_id), rules.STREAM_CLOSED, now)


async def detach_session(db: Statements, session_id: str, now: float) -> int:
    """See `Storage.detach_session`."""
    return await db.detach_leases(session_id, now)


async def resume(
    db: Statements, holder: LeaseHolder, server_id: str, items: Sequence[LeaseRef], now: float
) -> list[Ack]:
    """See `Storage.resume`."""
    acks = []
    for item in items:
        moved = await db.attach_lease(item.task_id, item.lease_id, holder, server_id)
        if moved is None:
            row = await db.settle_row(item.task_id, item.lease_id)
            acks.append(rules.settle_error(item.task_id, item.lease_id, row))
            continue
        deadline, stage = moved
        acks.append(
            Ack(
                item.task_id,
                item.lease_id,
                deadline=deadline,
                stage=stage,
                result=AckResult.RESUMED,
            )
        )
    return acks


async def heartbeat(db: Statements, server_id: str, host: str, pid: int, now: float) -> None:
    """See `Storage.heartbeat`."""
    await db.record_heartbeat(server_id, host, pid, now)


async def remove_server(db: Statements, server_id: str) -> None:
    """See `Storage.remove_server`."""
    await db.delete_server(server_id)


async def sweep(db: Statements, now: float, grace_seconds: float) -> Swept:
    """See `Storage.sweep`."""
    # A server silent past the grace is gone: its leases are detached since its last sign.
    await db.detach_silent_servers(now, grace_seconds)
    expired = await _end(db, await db.expired_leases(now), rules.LEASE_EXPIRED, now)
    await _revoke(db, expired, "expired", now)
    recovered = await _end(
        db,
        await db.unresumed_leases(now, grace_seconds),
        rules.NOT_RESUMED.format(grace=grace_seconds),
        now,
    )
    await db.forget_revocations(now, REVOCATIONS_KEPT_SECONDS)
    return Swept(expired, recovered)


async def revocations_after(db: Statements, after_id: int) -> RevocationPage:
    """See `Storage.revocations_after`."""
    if after_id < 0:  # the first read: start from the newest
        return RevocationPage(await db.last_revocation_id(), [])
    found = await db.revocations_after(after_id)
    if not found:
        return RevocationPage(after_id, [])
    return RevocationPage(found[-1][0], [revocation for _, revocation in found])


async def _selection(
    db: Statements, workflows: WorkflowCache, workflow: str, stage: str, task_ids: Sequence[int]
) -> TaskSelection:
    """The tasks a cancel or redrive names."""
    if task_ids:
        return TaskSelection(list(task_ids), "", ())
    if not workflow:
        raise InvalidArgument("workflow: required when no task_ids are given")
    stages = [stage] if stage else await stages_of(db, workflows, workflow)
    return TaskSelection((), workflow, stages)


async def cancel(
    db: Statements,
    workflows: WorkflowCache,
    workflow: str,
    stage: str,
    task_ids: Sequence[int],
    now: float,
) -> Cancelled:
    """See `Storage.cancel`."""
    return await cancel_selected(
        db, await _selection(db, workflows, workflow, stage, task_ids), now
    )


async def cancel_selected(db: Statements, selection: TaskSelection, now: float) -> Cancelled:
    """Cancel the tasks `selection` names; revoke the leases among them."""
    moved = await db.cancel_tasks(selection, now)
    ended = [
        EndedLease(t.task_id, t.lease_id or "", t.session_id, t.workflow, t.stage, False)
        for t in moved
        if t.state == "leased"
    ]
    await _revoke(db, ended, "cancelled", now)
    return Cancelled(len(moved), ended)


async def redrive(
    db: Statements,
    workflows: WorkflowCache,
    workflow: str,
    stage: str,
    task_ids: Sequence[int],
    now: float,
) -> int:
    """See `Storage.redrive`."""
    selection = await _selection(db, workflows, workflow, stage, task_ids)
    moved = await db.redrive_tasks(selection, now)
    for name in {w for w, _ in moved}:
        await db.notify_ready(name)
    return len(moved)
