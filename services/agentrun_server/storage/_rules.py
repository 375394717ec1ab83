"""The task rules, once for every backend: what a claim takes and what a settle means.

The procedures (`storage._procedures`) call these to decide, and an engine's statements to read
and write. Each is pure (records in, decisions out, no SQL):

- **Fencing**: a settle moves a task only while the lease it presents is the task's current one.
  The statements enforce it in the write itself (`... WHERE state = 'leased' AND lease_id = ?`,
  RETURNING what moved); `settle_error` explains a write that moved nothing.
- **Repeats**: a settle repeated under the same lease gets the answer it got the first time
  (`is_repeat`), so a worker may resend after a lost ack or a reconnect.
- **Retry or dead** after a failed attempt or a lease that ended unsettled, and the backoff before
  the retry (`failure_outcome`, `lease_end_is_dead`, `backoff_seconds`).
- **Routing**: the stage a pathway leads to (`route`).
- **Deletion**: what stands in the way of deleting runs (`leased_message`).
- **Byte budgets**: pages and lease batches stop before the item that would cross them
  (`take_within`, `choose_claims`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

from agentrun_server._errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServerError,
)
from agentrun_server.storage._types import (
    Ack,
    AckCode,
    AckResult,
    Completion,
    EventOutcome,
    EventStatus,
    Failure,
    Fold,
    Folded,
    LeasedTaskOfRun,
    NewEvent,
    StageDef,
    WorkflowDef,
)

_log = logging.getLogger(__name__)

BACKOFF_JITTER = 0.2
"""Backoffs vary by +-20 %, so that tasks failed together do not retry together."""

# Why an attempt ended without a settle from its worker, as stored in its failure record.
LEASE_EXPIRED = "lease expired"
STREAM_CLOSED = "worker closed its stream holding the lease"
NOT_RESUMED = "lease not resumed within {grace:g} s of its stream ending"


class SettleRow(NamedTuple):
    """What settling a task needs to know of it: read before a guarded write, and again after a
    write that moved nothing, to say why."""

    task_id: int
    state: str
    lease_id: str | None
    workflow: str
    stage: str
    attempt: int
    max_attempts: int
    pathway: str | None
    failure_under_lease: str | None = None
    """The error of a failure on record under the lease presented: a failed attempt, or the
    lease's end (LEASE_EXPIRED, STREAM_CLOSED, NOT_RESUMED); None without one."""
    session_id: str | None = None
    """The Work session holding the lease (None: detached, or not leased)."""


class Candidate(NamedTuple):
    """A ready task a claim may take, in dispatch order: priority, then FIFO."""

    priority: int
    ready_at: float
    task_id: int
    stage: str
    size_bytes: int
    """The run's and the stage input's encoded bytes: what the lease will carry."""


def backoff_seconds(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retrying after failed attempt `attempt` (from 1): doubling from `initial` up
    to `maximum`, +-20 % jitter."""
    base = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return base * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)


def take_within(sizes: Sequence[int], limit: int, max_bytes: int | None) -> tuple[int, bool]:
    """How many of the first items to take, and whether more follow: at most `limit` items whose
    sizes sum to at most `max_bytes`, the first item regardless (a large item goes alone rather
    than never). For a page, `sizes` holds up to `limit + 1` items, so that one more tells there are
    more."""
    kept, total = 0, 0
    for size in sizes[:limit]:
        total += size
        if kept and max_bytes is not None and total > max_bytes:
            return kept, True
        kept += 1
    return kept, len(sizes) > limit


def choose_claims(
    candidates: list[Candidate], limit: int, max_bytes: int | None
) -> list[Candidate]:
    """The tasks one claim leases: the best `limit` candidates in dispatch order (highest
    priority first, FIFO within a priority), stopping before `max_bytes` (the first regardless).

    `candidates` holds each stage's first ready tasks, already within that stage's own limit.
    """
    candidates.sort(key=lambda c: (-c.priority, c.ready_at, c.task_id))
    chosen = candidates[:limit]
    kept, _ = take_within([c.size_bytes for c in chosen], len(chosen), max_bytes)
    return chosen[:kept]


def held_elsewhere(row: SettleRow, holder: str) -> bool:
    """Whether another Work session than `holder` holds the lease ("" : any may settle it)."""
    return bool(holder) and row.session_id is not None and row.session_id != holder


def is_current(row: SettleRow | None, lease_id: str, holder: str = "") -> bool:
    """Whether `lease_id` is the task's current lease, held by `holder` (or detached): the one
    thing that lets a settle move it. A lease is settled through the stream holding it (the one
    it was pushed on, or the one that resumed it), so no stream can take another's credit."""
    return (
        row is not None
        and row.state == "leased"
        and row.lease_id == lease_id
        and not held_elsewhere(row, holder)
    )


def settle_error(task_id: int, lease_id: str, row: SettleRow | None, holder: str = "") -> Ack:
    """The answer to a settle whose lease is not current: NOT_FOUND (no such task) or
    FAILED_PRECONDITION (a stale lease: expired, released, settled otherwise, or superseded; or
    a lease another stream holds)."""
    if row is None:
        return Ack(task_id, lease_id, AckCode.NOT_FOUND, f"no task with id {task_id}")
    if row.state == "leased" and row.lease_id == lease_id and held_elsewhere(row, holder):
        return Ack(
            task_id,
            lease_id,
            AckCode.FAILED_PRECONDITION,
            f"task {task_id}: its lease is held by another Work stream; settle it there, or "
            "resume it on this one (subscribe.resume)",
            stage=row.stage,
        )
    other = row.lease_id not in (None, lease_id) and row.state == "leased"
    return Ack(
        task_id,
        lease_id,
        AckCode.FAILED_PRECONDITION,
        f"stale lease: task {task_id} is {row.state}" + (" under another lease" if other else ""),
        stage=row.stage,
    )


def is_lease_end(error: str) -> bool:
    """Whether a failure record was written by the end of a lease, not by its worker."""
    return error in (LEASE_EXPIRED, STREAM_CLOSED) or error.startswith(NOT_RESUMED.split("{")[0])


def is_repeat(kind: str, row: SettleRow | None, lease_id: str, pathway: str = "") -> bool:
    """Whether a settle that moved nothing repeats one that did, under the same lease: answered
    OK again. `kind` is "complete" (same pathway), "fail" or "release"."""
    if row is None:
        return False
    if kind == "complete":
        return row.state == "done" and row.lease_id == lease_id and row.pathway == pathway
    failure = row.failure_under_lease
    if kind == "fail":  # a fail after its lease ended is stale, like any other settle
        return failure is not None and not is_lease_end(failure)
    if kind == "release":
        # A release keeps the lease id on the ready task until it is leased again.
        return row.state == "ready" and row.lease_id == lease_id and failure is None
    return False


def answer_miss(
    kind: str,
    task_id: int,
    lease_id: str,
    row: SettleRow | None,
    pathway: str = "",
    holder: str = "",
) -> Ack:
    """The answer to a settle that moved nothing: OK for a repeat, else why it is refused."""
    if is_repeat(kind, row, lease_id, pathway):
        assert row is not None
        return Ack(task_id, lease_id, stage=row.stage, result=AckResult.REPEAT)
    return settle_error(task_id, lease_id, row, holder)


def route(workflow: WorkflowDef, stage: str, pathway: str) -> StageDef | None:
    """The stage `pathway` leads to from `stage` (None: the end of the workflow).

    Raises:
        InvalidArgument: the stage has no such pathway; the message lists the valid ones.
        NotFound: the workflow no longer has the stage.
    """
    target = workflow.stage(stage).next_stage(pathway)
    return None if target is None else workflow.stage(target)


class CompletionPlan(NamedTuple):
    """What a batch of completions will write, decided from the tasks as read."""

    acks: list[Ack | None]
    """Per item: its answer now, or None when its write decides (done, or a miss)."""
    done: list[Completion]
    """Completions to write, each under its guard; at most one per task."""
    follow: dict[int, StageDef]
    """Task -> the stage its next task enters (absent: the pathway ends the workflow)."""


def plan_completions(
    items: Sequence[Completion],
    rows: dict[int, SettleRow],
    workflow: Callable[[str], WorkflowDef],
    holder: str = "",
) -> CompletionPlan:
    """Decide each completion: refused (a stale lease, one another stream holds than `holder`,
    or a pathway its stage lacks: the lease is kept), a repeat, or to be written with the next
    stage it routes to. A task named twice in a batch is judged the second time as the first
    left it."""
    acks: list[Ack | None] = []
    done: list[Completion] = []
    follow: dict[int, StageDef] = {}
    # The hot path: each (workflow, stage, pathway) is routed once per batch.
    routes: dict[tuple[str, str, str], StageDef | InvalidArgument | NotFound | None] = {}
    planned: dict[int, Completion] = {}
    for item in items:
        row = rows.get(item.task_id)
        if not is_current(row, item.lease_id, holder):
            acks.append(
                answer_miss("complete", item.task_id, item.lease_id, row, item.pathway, holder)
            )
            continue
        assert row is not None
        first = planned.get(item.task_id)
        if first is not None:  # done by its first mention in this batch
            row = row._replace(state="done", pathway=first.pathway)
            acks.append(answer_miss("complete", item.task_id, item.lease_id, row, item.pathway))
            continue
        key = (row.workflow, row.stage, item.pathway)
        if key in routes:
            target = routes[key]
        else:
            try:
                target = routes[key] = route(workflow(row.workflow), row.stage, item.pathway)
            except (InvalidArgument, NotFound) as exc:
                target = routes[key] = exc
        if isinstance(target, (InvalidArgument, NotFound)):
            acks.append(
                Ack(
                    item.task_id,
                    item.lease_id,
                    AckCode.INVALID_ARGUMENT,
                    str(target),
                    stage=row.stage,
                )
            )
            continue
        planned[item.task_id] = item
        done.append(item)
        if target is not None:
            follow[item.task_id] = target
        acks.append(None)
    return CompletionPlan(acks, done, follow)


def failure_outcome(row: SettleRow, item: Failure, stage: StageDef) -> tuple[bool, float]:
    """(dead, delay in seconds) after a failed attempt: dead when non-retryable or the attempts
    are spent; else ready again after the worker's retry-after, or the stage's backoff."""
    if item.non_retryable or row.attempt >= row.max_attempts:
        return True, 0.0
    delay = item.retry_after_seconds
    if delay is None:
        delay = backoff_seconds(
            row.attempt, stage.initial_backoff_seconds, stage.max_backoff_seconds
        )
    return False, delay


def lease_end_is_dead(attempt: int, max_attempts: int) -> bool:
    """Whether a lease that ended unsettled (expired, its stream closed, never resumed) leaves its
    task dead: the attempt counts, since the worker may have died of the task."""
    return attempt >= max_attempts


RUN_STATES = ("running", "finished", "abandoned")


def run_state(state: str, updated_at: float | None, abandoned_before: float) -> str:
    """A run's state as read: a running run with no event since `abandoned_before` is
    abandoned (a later event reopens it, so the state is decided when read, not stored)."""
    if state == "running" and (updated_at or 0.0) < abandoned_before:
        return "abandoned"
    return state


NOTHING_TO_ENTER = -1.0
"""`agent_runs.entered_at` of a run abandoned with nothing a stage could work on (no transcript):
it left the sweep, and its finish enters it. NULL: not entered; else when it entered."""


def enters_at_finish(entered_at: float | None) -> bool:
    """Whether a run finishing now enters its workflow: unless it entered when abandoned."""
    return entered_at is None or entered_at < 0


def fold_abandoned(fold: Fold, run_id: str, parts: Sequence[bytes]) -> Folded | None:
    """The run an abandoned run's events make, to enter into its workflow; None when `fold`
    refuses it (no transcript yet: nothing for a stage to work on)."""
    try:
        return fold(run_id, parts)
    except InvalidArgument as exc:
        _log.info("abandoned run %r does not enter its workflow: %s", run_id, exc)
        return None


def _refused(error: ServerError, next_sequence: int) -> EventOutcome:
    return EventOutcome(EventStatus.REFUSED, next_sequence, error)


def first_event_refusal(event: NewEvent, max_run_bytes: int) -> EventOutcome | None:
    """Why the first event of a run that does not exist cannot create it, or None if it can
    (its collection still to be found)."""
    if event.sequence != 1:
        return _refused(
            FailedPrecondition(
                f"sequence: {event.sequence} for run {event.run_id!r}, which does not exist: "
                "its first event is sequence 1"
            ),
            0,
        )
    if not event.collection_id:
        return _refused(InvalidArgument("collection_id: required on a run's first event"), 0)
    return _size_refusal(event, len(event.patch), max_run_bytes, 0)


def event_digest(patch: bytes, finish: bool) -> bytes:
    """What identifies an event's content (its canonical patch and whether it finishes the run):
    16 bytes of SHA-256."""
    return hashlib.sha256(patch + (b"\x01" if finish else b"\x00")).digest()[:16]


def stored_digest(digest: bytes | None, data: bytes, finishes: bool) -> bytes:
    """The digest of a stored event: kept with it, or (stored before digests were kept) made from
    its patch and whether it finished the run."""
    return bytes(digest) if digest is not None else event_digest(bytes(data), finishes)


def next_event_refusal(
    event: NewEvent,
    collection_id: str,
    state: str,
    expected: int,
    size: int,
    max_run_bytes: int,
    stored: bytes | None = None,
) -> EventOutcome | None:
    """What becomes of an event of a stored run (in `collection_id` and `state`, expecting
    sequence `expected`, holding `size` bytes of events) short of storing it: DUPLICATE for a
    resend of a stored event (`stored`: the digest of the event stored under its sequence
    number, read by the caller when it is below `expected`), REFUSED for another event under a
    stored number (ABORTED: nothing is stored, never answered DUPLICATE), another collection, a
    run uploaded whole, a finished run, a gap, or one over `max_run_bytes`; None: store it."""
    if event.collection_id and event.collection_id != collection_id:
        return _refused(
            AlreadyExists(
                f"run {event.run_id!r} is in another collection, not {event.collection_id!r}"
            ),
            expected,
        )
    if expected == 0:
        return _refused(
            AlreadyExists(f"run {event.run_id!r} was uploaded whole: it takes no events"), 0
        )
    if event.sequence < expected:
        if stored is None or not event.digest or stored == event.digest:
            return EventOutcome(EventStatus.DUPLICATE, expected)
        return _refused(
            Aborted(
                f"sequence: {event.sequence} of run {event.run_id!r} holds a different event; the "
                f"run has {expected - 1} events and continues at {expected}. Another writer is "
                "appending to this run, or this one restarted without its spool: nothing of this "
                "event was stored"
            ),
            expected,
        )
    if state == "finished":
        return _refused(
            FailedPrecondition(f"run {event.run_id!r} is finished: it takes no more events"),
            expected,
        )
    if event.sequence > expected:
        return _refused(
            FailedPrecondition(
                f"sequence: {event.sequence} for run {event.run_id!r}, which expects "
                f"{expected} next (resend from {expected})"
            ),
            expected,
        )
    return _size_refusal(event, size + len(event.patch), max_run_bytes, expected)


def _size_refusal(
    event: NewEvent, size: int, max_run_bytes: int, expected: int
) -> EventOutcome | None:
    if size <= max_run_bytes:
        return None
    return _refused(
        ResourceExhausted(
            f"run {event.run_id!r}: {size:,} bytes of events, over max_live_run_bytes="
            f"{max_run_bytes}"
        ),
        expected,
    )


def folded(
    fold: Fold, event: NewEvent, parts: Sequence[bytes], expected: int
) -> Folded | EventOutcome:
    """The run that a finishing event makes (its earlier events' `parts`, then its own patch),
    or the refusal of the event when `fold` refuses the run."""
    try:
        return fold(event.run_id, [*parts, event.patch])
    except InvalidArgument as exc:
        return _refused(exc, expected)


def leased_message(leased: Sequence[LeasedTaskOfRun], runs: int) -> str:
    """Why a deletion is refused: how many leased tasks, where, and what to do."""
    where = Counter(f"{t.workflow}/{t.stage}" for t in leased)
    stages = ", ".join(f"{n} in {place}" for place, n in where.most_common(5))
    more = f" and {len(where) - 5} more stages" if len(where) > 5 else ""
    example = leased[0]
    return (
        f"{len(leased)} task(s) of {runs} run(s) to delete are leased ({stages}{more}; e.g. "
        f"task {example.task_id} of run {example.run_id[:256]!r}): nothing was deleted; wait "
        "for their workers to settle them, cancel them (agentrun tasks cancel), or delete with "
        "force, which cancels them and revokes their leases"
    )
