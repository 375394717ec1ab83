"""The worker's half of the Work protocol as a state machine with no I/O: what to write, and what
each message from the server changes. `WorkStream` drives it over gRPC; a worker in another
language mirrors it (README: "The Work stream, for workers in any language").

The rules it keeps:

- **Credits**: the server pushes at most `credits` leases not yet settled.
- **Settles** (complete, fail, release) are queued and written in batches, one message per kind.
  With no settle awaiting its ack, they go at once; while one does, they wait for that ack (or
  for a full message, `MESSAGE_ITEMS`), as Nagle's algorithm does for TCP: one settle costs no
  delay, and a stream of them goes in messages sized to the server's pace. Each message gets one
  `AckBatch`, in order.
- **Extensions**: a lease still held when half of it has passed is extended by its duration.
- **Heartbeats**: with nothing else written for a third of the server's idle timeout
  (`Subscribed.idle_timeout`), a `heartbeat` is.
- **Revocations**: a lease the server takes back (cancelled, expired) is dropped, and reported:
  its task must stop, and is never settled.
- **Drain**: a `drain` is written before any release queued after it, so the server stops
  pushing before the handed-back tasks are ready again (it would push them straight back).
- **Reconnect and resume**: on a new stream, the leases still held are presented in
  `Subscribe.resume`; settles written on the old stream and never acknowledged are written again
  (a repeat is answered as the first was); a lease the server does not resume is reported as
  revoked. A server shutting down asks for a reconnect (`Reconnect`): the stream writes nothing
  more, closes its side and reads to the end.
- **Close**: leases never handed out are released, what was settled is written, then the
  stream's side is closed: the server ends whatever is still held at once.

Times are epoch seconds, passed in by the caller (`now`).
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from agentrun.v1 import agent_run_pb2
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.wire.codes import Code

SETTLES = ("complete_tasks", "fail_tasks", "release_tasks")
"""The kinds of message that settle leases, written in this order."""
_FIELDS = {
    "complete_tasks": "completions",
    "fail_tasks": "failures",
    "release_tasks": "releases",
    "extend_leases": "extensions",
}
_VERBS = {"complete_tasks": "completion", "release_tasks": "release"}
MESSAGE_ITEMS = 64
"""Most settles (or extensions) in one message. Many tasks that end at once (a lease batch of
quick stage functions, or of calls that all waited the same second) go in messages of this
many: the server completes the first and leases their successors while this side still reads
the rest, rather than one side waiting on the other for the whole batch."""


class Lease(NamedTuple):
    """A task leased to this worker: settle it by `task_id` and `lease_id` (the fencing token)."""

    task_id: str
    lease_id: str
    stage: str
    attempt: int
    """This attempt's number, from 1."""
    max_attempts: int
    deadline: float
    """When the lease ends unless extended, epoch seconds."""
    created_at: float
    """When the task was made, epoch seconds."""
    collection_id: str
    priority: int
    agent_run: agent_run_pb2.AgentRun
    """The run, in its wire form (`agentrun.agent_run_from_proto` makes the model)."""
    input: agent_run_pb2.Value | None
    """The previous stage's output, if it gave one."""

    @property
    def agent_run_id(self) -> str:
        return self.agent_run.id

    @classmethod
    def of(cls, wire: pb.Lease) -> Lease:
        """The record of a lease as the server sent it."""
        return cls(
            wire.task_id,
            wire.lease_id,
            wire.stage,
            wire.attempt,
            wire.max_attempts,
            _seconds(wire.deadline),
            _seconds(wire.create_time),
            wire.collection_id,
            wire.priority,
            wire.agent_run,
            wire.input if wire.HasField("input") else None,
        )


@dataclass
class HeldLease:
    """A lease this worker holds and has not settled: when it ends, and how long to extend it by."""

    lease: Lease
    deadline: float
    """Epoch seconds."""
    duration: float
    """Seconds: the lease's length when granted, used for each extension."""
    extending: bool = False

    @property
    def extend_at(self) -> float:
        """When to extend it: half its duration before the deadline (epoch seconds)."""
        return self.deadline - self.duration / 2


class Refusal(NamedTuple):
    """A settle the server refused (an ack with a code other than OK)."""

    task_id: str
    kind: str
    code: int
    message: str
    resent: bool
    """It was a settle written again after a reconnect (a refusal then is expected)."""


def _seconds(timestamp: Any) -> float:
    return float(timestamp.seconds + timestamp.nanos / 1e9)


class WorkProtocol:
    """One worker's Work session, across the streams that carry it. No I/O, no clock: the caller
    writes what `outgoing` returns, hands over what it reads, and says when a stream ends.

    Args:
        workflow: The workflow whose stages are served.
        stages: The stages served.
        credits: Leases held at once (leased and not yet settled).
        max_tasks_per_stage: Take at most this many tasks of each stage in all (None: no limit).
        notify_when_empty: Finish once the stages hold no task and nothing is held.
        worker: A name for the server's logs.
    """

    def __init__(
        self,
        workflow: str,
        stages: Iterable[str],
        credits: int,
        *,
        max_tasks_per_stage: int | None = None,
        notify_when_empty: bool = False,
        worker: str = "",
    ) -> None:
        self.workflow = workflow
        self.stages = list(stages)
        self.credits = credits
        self.max_tasks = max_tasks_per_stage
        self.notify_when_empty = notify_when_empty
        self.worker = worker
        self.held: dict[str, HeldLease] = {}
        """Task id -> the lease held (handed out or not, not yet settled)."""
        self.leased: collections.Counter[str] = collections.Counter()
        """Leases received per stage, over every stream."""
        self.subscribed: pb.Subscribed | None = None
        """The server's answer to the last subscribe (the workflow, as the server has it)."""
        self.refusals: list[Refusal] = []
        """Settles the server refused since last read (the caller logs and clears them)."""
        self.ready: collections.deque[Lease] = collections.deque()
        """Leases received and not yet handed out."""
        self.empty = False
        """The server said the stages are empty (with `notify_when_empty`)."""
        self.draining = False
        self.closing = False
        self.reconnect_asked = False
        """The server asked this stream's worker to reconnect: write nothing more on it."""
        self._pending: dict[str, list[Any]] = {kind: [] for kind in (*SETTLES, "extend_leases")}
        self._written: collections.deque[tuple[str, list[Any]]] = collections.deque()
        """Messages written on the current stream and not yet acked: (kind, items)."""
        self._settles_written = 0
        """Of `_written`, the settle messages."""
        self._resent: set[tuple[str, str]] = set()
        self._drain_pending = False
        self._idle_timeout: float | None = None
        self._extend_floor = math.inf
        """No held lease is due for an extension before this (epoch seconds; a lower bound)."""
        self._last_write = 0.0

    # --- a stream's start and end -------------------------------------------------------------

    def subscribe(self, now: float) -> pb.WorkRequest:
        """The first message of a new stream: the subscription, resuming every lease held."""
        self.reconnect_asked = False
        self._last_write = now
        stages = []
        for stage in self.stages:
            if self.max_tasks is None:
                stages.append(pb.StageSubscription(stage=stage))
            elif self.leased[stage] < self.max_tasks:
                stages.append(
                    pb.StageSubscription(stage=stage, max_tasks=self.max_tasks - self.leased[stage])
                )
        # With every quota taken, the stream still settles what is held: leases pushed anyway
        # (max_tasks 0 means no limit) are handed back as they come.
        return pb.WorkRequest(
            subscribe=pb.Subscribe(
                workflow=self.workflow,
                stages=stages or [pb.StageSubscription(stage=s) for s in self.stages],
                credits=self.credits,
                worker=self.worker,
                notify_when_empty=self.notify_when_empty,
                resume=[
                    pb.LeaseRef(task_id=h.lease.task_id, lease_id=h.lease.lease_id)
                    for h in self.held.values()
                ],
            )
        )

    def on_subscribed(
        self, subscribed: pb.Subscribed, resumed: Iterable[Lease]
    ) -> list[tuple[Lease, str]]:
        """The server's answer to `subscribe` (which resumed `resumed`, in order); the leases it
        did not resume, and why: revoked. Settles the last stream never heard back about are
        queued again."""
        self.subscribed = subscribed
        idle = subscribed.idle_timeout
        has_idle = subscribed.HasField("idle_timeout")
        self._idle_timeout = idle.seconds + idle.nanos / 1e9 if has_idle else None
        revoked = []
        for lease, ack in zip(resumed, subscribed.resumed, strict=False):
            held = self.held.get(lease.task_id)
            if held is None or held.lease.lease_id != lease.lease_id:
                continue  # settled meanwhile: the settle goes out below
            if ack.code == Code.OK:
                held.deadline = _seconds(ack.deadline)
                held.extending = False
            else:
                revoked.append((self._revoke(held), f"not resumed: {ack.message}"))
        # What the last stream wrote and never heard back about goes again: a repeat is
        # answered as the first was. Extensions are redone when they come due.
        for kind, items in self._written:
            if kind in SETTLES:
                self._pending[kind][:0] = items
                self._resent.update((i.task_id, i.lease_id) for i in items)
        self._written.clear()
        self._settles_written = 0
        for held in self.held.values():
            held.extending = False  # an extension written on a broken stream is lost
        self._extend_floor = min((h.extend_at for h in self.held.values()), default=math.inf)
        self._drain_pending = self.draining  # a new session knows nothing of the old drain
        return revoked

    # --- the server's messages ----------------------------------------------------------------

    def on_response(self, response: pb.WorkResponse, now: float) -> list[tuple[Lease, str]]:
        """A message from the server; the leases it took back, and why (their tasks must stop,
        and are never settled)."""
        kind = response.WhichOneof("kind")
        if kind == "leases":
            for wire in response.leases.leases:
                lease = Lease.of(wire)
                self.leased[lease.stage] += 1
                new = HeldLease(lease, lease.deadline, max(0.0, lease.deadline - now))
                self.held[lease.task_id] = new
                self._extend_floor = min(self._extend_floor, new.extend_at)
                if self.max_tasks is not None and self.leased[lease.stage] > self.max_tasks:
                    self.release(lease)  # over this worker's quota (see subscribe)
                else:
                    self.ready.append(lease)
            self.empty = False
        elif kind == "acks":
            self._on_acks(response.acks)
        elif kind == "revoked":
            revoked = []
            for item in response.revoked.leases:
                held = self.held.get(item.task_id)
                if held is not None and held.lease.lease_id == item.lease_id:
                    reason = pb.RevokeReason.Name(item.reason).removeprefix("REVOKE_REASON_")
                    revoked.append((self._revoke(held), reason.lower()))
            return revoked
        elif kind == "stages_empty":
            self.empty = True
        elif kind == "reconnect":  # the server is shutting down: close our side, read to the end
            self.reconnect_asked = True
        return []

    def _revoke(self, held: HeldLease) -> Lease:
        del self.held[held.lease.task_id]
        with contextlib.suppress(ValueError):
            self.ready.remove(held.lease)
        return held.lease

    def _on_acks(self, batch: pb.AckBatch) -> None:
        if not self._written:
            self.refusals.append(Refusal("", "", -1, "an ack batch no message awaits", False))
            return
        kind, _ = self._written.popleft()
        if kind in SETTLES:
            self._settles_written -= 1
        for ack in batch.acks:
            held = self.held.get(ack.task_id)
            mine = held is not None and held.lease.lease_id == ack.lease_id
            if kind == "extend_leases" and held is not None and mine:
                held.extending = False
                if ack.code == Code.OK:
                    held.deadline = _seconds(ack.deadline)
                self._extend_floor = min(self._extend_floor, held.extend_at)
            resent = (ack.task_id, ack.lease_id) in self._resent
            self._resent.discard((ack.task_id, ack.lease_id))
            if ack.code == Code.INVALID_ARGUMENT and kind in ("complete_tasks", "release_tasks"):
                # Refused as malformed, the lease is still held on the server: fail the attempt
                # with the server's reason rather than leave it leased until it expires.
                self._pending["fail_tasks"].append(
                    pb.TaskFailure(
                        task_id=ack.task_id,
                        lease_id=ack.lease_id,
                        error=f"the server refused the worker's {_VERBS[kind]}: {ack.message}",
                        non_retryable=kind == "complete_tasks",
                    )
                )
            if ack.code != Code.OK:
                self.refusals.append(Refusal(ack.task_id, kind, ack.code, ack.message, resent))

    # --- the worker's settles -----------------------------------------------------------------

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` is still this worker's to settle (not settled, revoked or lost)."""
        held = self.held.get(lease.task_id)
        return held is not None and held.lease.lease_id == lease.lease_id

    def complete(
        self, lease: Lease, pathway: str, output: agent_run_pb2.Value | None = None
    ) -> bool:
        """Queue the completion of a held lease with a pathway ("" at a terminal stage); False
        if the lease is no longer held (nothing is queued)."""
        item = pb.TaskCompletion(task_id=lease.task_id, lease_id=lease.lease_id, pathway=pathway)
        if output is not None:
            item.output.CopyFrom(output)
        return self._settle(lease, "complete_tasks", item)

    def fail(
        self,
        lease: Lease,
        error: str,
        non_retryable: bool = False,
        retry_after_seconds: float | None = None,
    ) -> bool:
        """Queue the failure of a held lease's attempt (retried by the server unless
        `non_retryable` or its attempts are spent)."""
        item = pb.TaskFailure(
            task_id=lease.task_id,
            lease_id=lease.lease_id,
            error=error,
            non_retryable=non_retryable,
        )
        if retry_after_seconds is not None:
            item.retry_after.FromNanoseconds(int(retry_after_seconds * 1e9))
        return self._settle(lease, "fail_tasks", item)

    def release(self, lease: Lease, after_seconds: float | None = None) -> bool:
        """Queue the hand-back of a held lease: ready again at once (or after `after_seconds`),
        no attempt spent."""
        item = pb.TaskRelease(task_id=lease.task_id, lease_id=lease.lease_id)
        if after_seconds:
            item.retry_after.FromNanoseconds(int(after_seconds * 1e9))
        return self._settle(lease, "release_tasks", item)

    def drain(self) -> None:
        """Ask for no more leases; the worker finishes once nothing is held."""
        if not self.draining:
            self.draining = self._drain_pending = True

    def close(self) -> None:
        """Hand back the leases never handed out; after what is queued, close this side."""
        self.closing = True
        while self.ready:
            self.release(self.ready.popleft())

    def _settle(self, lease: Lease, kind: str, item: Any) -> bool:
        if not self.holds(lease):
            return False
        del self.held[lease.task_id]
        self._pending[kind].append(item)
        return True

    # --- what to write ------------------------------------------------------------------------

    def outgoing(self, now: float) -> list[pb.WorkRequest]:
        """The messages to write now, in order: a drain first, then the settles queued (by
        kind, `MESSAGE_ITEMS` at most per message), then the extensions due, or a heartbeat if nothing was written for a
        third of the idle timeout. They count as written (their acks awaited) from here."""
        if self.reconnect_asked:
            return []  # what is queued goes on the next stream
        out = []
        # A drain goes first: the server must stop pushing before the leases handed back with
        # it are ready again, or it would push them straight back here.
        if self._drain_pending:
            self._drain_pending = False
            out.append(pb.WorkRequest(drain=pb.Drain()))
        self._extensions_due(now)
        # Settles wait for the ack of those written before them, unless the worker is closing
        # or draining (what it hands back should be ready again at once).
        hold_back = self._settles_written > 0 and not (self.closing or self.draining)
        for kind in (*SETTLES, "extend_leases"):
            queued = self._pending[kind]
            whole = len(queued)
            if hold_back and kind in SETTLES:
                whole -= whole % MESSAGE_ITEMS  # full messages only
            if not whole:
                continue
            self._pending[kind] = queued[whole:]
            for start in range(0, whole, MESSAGE_ITEMS):
                items = queued[start : min(whole, start + MESSAGE_ITEMS)]
                self._written.append((kind, items))
                if kind in SETTLES:
                    self._settles_written += 1
                request = pb.WorkRequest()
                getattr(getattr(request, kind), _FIELDS[kind]).extend(items)
                out.append(request)
        if not out and self._heartbeat_due(now):
            out.append(pb.WorkRequest(heartbeat=pb.Heartbeat()))
        if out:
            self._last_write = now
        return out

    @property
    def done_writing(self) -> bool:
        """Whether this side of the stream should close now: closing with nothing left to
        write, or asked to reconnect."""
        return self.reconnect_asked or (self.closing and not any(self._pending.values()))

    def next_write_at(self, now: float) -> float:
        """When `outgoing` may next have something to write unprompted (an extension or a
        heartbeat coming due), epoch seconds; at most a second from `now`."""
        soon = min(now + 1.0, self._extend_floor)
        if self._idle_timeout is not None:
            soon = min(soon, self._last_write + self._idle_timeout / 3)
        return max(now, soon)

    def _extensions_due(self, now: float) -> None:
        # Every held lease is looked at only once the earliest may be due: a Runner holding a
        # thousand leases writes many times a second, and each look was a walk of them all.
        if now < self._extend_floor:
            return
        floor = math.inf
        for held in self.held.values():
            if held.extending:
                continue
            if held.extend_at <= now:
                held.extending = True
                item = pb.LeaseExtension(task_id=held.lease.task_id, lease_id=held.lease.lease_id)
                item.lease_duration.FromNanoseconds(int(held.duration * 1e9))
                self._pending["extend_leases"].append(item)
            else:
                floor = min(floor, held.extend_at)
        self._extend_floor = floor

    def _heartbeat_due(self, now: float) -> bool:
        return self._idle_timeout is not None and now - self._last_write >= self._idle_timeout / 3

    # --- where things stand -------------------------------------------------------------------

    @property
    def unsettled(self) -> int:
        """Settles queued or written and not yet acknowledged."""
        return sum(len(self._pending[k]) for k in SETTLES) + sum(
            len(items) for kind, items in self._written if kind in SETTLES
        )

    def quota_reached(self) -> bool:
        """Whether every stage's `max_tasks_per_stage` is taken."""
        return self.max_tasks is not None and all(
            self.leased[s] >= self.max_tasks for s in self.stages
        )

    @property
    def finished(self) -> bool:
        """Whether the worker is done taking leases: nothing held, and the stages are empty (with
        `notify_when_empty`), every quota is taken, or it drains or closes."""
        return not self.held and (
            self.empty or self.draining or self.closing or self.quota_reached()
        )

    def resumable(self) -> list[Lease]:
        """The leases a new stream resumes, in the order `subscribe` presents them."""
        return [held.lease for held in self.held.values()]
