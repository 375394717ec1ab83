"""The dispatcher: pushes ready tasks to subscribed Work sessions, within their credits.

One loop per server. It wakes when something may have become ready (a notice from this process or,
through the notifier, from another sharing the database; credits granted; a session opened) and
otherwise every `poll_interval_seconds`, which catches retries whose backoff elapsed. Each pass
claims, per session with free credits, up to that many tasks in one storage call.

Every `sweep_interval_seconds` it also vouches for this server's leases (a heartbeat) and sweeps:
leases past their deadline, and leases detached from their stream that nobody resumed within
`resume_grace_seconds`, go back to ready (or die). A lease outlives its stream: a session that
ends without its worker closing it (the worker vanished, or this server is shutting down) only
detaches its leases, which the worker resumes on its next stream, here or at another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun_server._errors import Unavailable
from agentrun_server.orchestrator._metrics import OrchestratorMetrics
from agentrun_server.storage import (
    Ack,
    ClaimRequest,
    Completion,
    EndedLease,
    LeasedTask,
    LeaseRef,
    LocalNotifier,
    Notifier,
    Release,
    Revocation,
    StageBacklog,
    Storage,
    WorkflowDef,
)

_log = logging.getLogger(__name__)

UNLIMITED = 2**31 - 1
MAX_CLAIM_TASKS = 1000
"""The most tasks one claim leases: a session with more free credits gets further batches, each
pass bounded however many credits it was granted."""
POLL_INTERVAL_SECONDS = 0.25
SWEEP_INTERVAL_SECONDS = 1.0
RESUME_GRACE_SECONDS = 15.0
"""How long a lease detached from its stream waits for its worker to resume it."""
MAX_UNSENT = 2
"""Lease batches that may wait for a stream's writer: one more, and the stream is backed up (it
reads nothing), so it is leased nothing until it reads again."""
RECONNECT_WAIT_SECONDS = 2.0
"""How long a shutting-down server waits for asked workers to close their streams themselves."""
CLOSE_STREAMS_TIMEOUT_SECONDS = 3.0

_REVOKE_REASONS = {"cancelled": pb.REVOKE_REASON_CANCELLED, "expired": pb.REVOKE_REASON_EXPIRED}


@dataclass(eq=False)
class Session:
    """One open Work stream."""

    id: str
    key: str
    """The API key it was opened with ("" when the server checks none)."""
    window: int
    """Fairness: it holds at most this many leases beyond those it has settled (`settled`)."""
    worker: str
    workflow: WorkflowDef
    stage_quota: dict[str, int]
    """Stage -> tasks still allowed on this stream (UNLIMITED when uncapped)."""
    credits: int
    lease_seconds: float | None
    notify_when_empty: bool
    max_batch_bytes: int
    """Most encoded bytes one lease batch carries (the first lease goes regardless)."""
    outbox: asyncio.Queue[pb.WorkResponse | BaseException | None] = field(
        default_factory=asyncio.Queue
    )
    max_leased_bytes: int = 2**62
    """Most encoded bytes of unsettled leases this stream may hold: above it, no more leases."""
    in_flight: dict[str, float] = field(default_factory=dict)
    """Lease id -> when it was pushed (or resumed), for leases not yet settled: they hold the
    credits. Change it through `hold` and `drop`, which keep `held_bytes`."""
    lease_bytes: dict[str, int] = field(default_factory=dict)
    """Lease id -> the encoded bytes it carried, for leases in `in_flight` pushed here."""
    held_bytes: int = 0
    draining: bool = False
    reconnecting: bool = False
    """Asked to reconnect (the server is shutting down): its close detaches, never hands back."""
    closed: bool = False
    empty_sent: bool = False
    claiming: bool = False
    """A claim for this session is in storage: no second one may count the same credits."""
    settled: int = 0
    """Leases it held and settled itself (not revoked): each widens its window by one."""
    unsent: int = 0
    """Lease batches queued for it and not yet taken by its stream's writer: while MAX_UNSENT
    wait, the stream is not reading, and it is leased nothing more (they would pile up here)."""
    key_held: dict[str, int] = field(default_factory=dict)
    """Leases held per API key, over every session of the dispatcher (shared)."""
    starved: bool = False
    """Its last claim found fewer ready tasks than it could take: tasks are scarce for it."""

    @property
    def free_credits(self) -> int:
        """Credits not held by a lease, within its window (none while the stream holds
        `max_leased_bytes`)."""
        if self.held_bytes >= self.max_leased_bytes:
            return 0
        allowed = min(self.credits, self.window + self.settled)
        return max(0, allowed - len(self.in_flight))

    @property
    def free_bytes(self) -> int:
        """Encoded bytes of leases this stream may still be sent."""
        return max(0, self.max_leased_bytes - self.held_bytes)

    def hold(self, lease_id: str, now: float, size: int = 0) -> None:
        """Count a lease pushed (or resumed) on this stream as held."""
        if lease_id not in self.in_flight and self.key:
            self.key_held[self.key] = self.key_held.get(self.key, 0) + 1
        self.in_flight[lease_id] = now
        if size:
            self.lease_bytes[lease_id] = size
            self.held_bytes += size

    def drop(self, lease_id: str, settled: bool = False) -> float | None:
        """Stop counting a lease (`settled` by the worker, or revoked); when it was held, or None
        if it was not."""
        held_at = self.in_flight.pop(lease_id, None)
        size = self.lease_bytes.pop(lease_id, 0)
        self.held_bytes -= size
        if held_at is not None:
            self.settled += settled
            if self.key:
                left = self.key_held[self.key] - 1
                if left:
                    self.key_held[self.key] = left
                else:
                    del self.key_held[self.key]
        return held_at

    def competes_with(self, other: Session) -> bool:
        """Whether both serve one stage of one workflow (the same tasks could go to either)."""
        return self.workflow.name == other.workflow.name and not self.stage_quota.keys().isdisjoint(
            other.stage_quota
        )

    @property
    def backed_up(self) -> bool:
        """Whether its stream is not reading what is sent (MAX_UNSENT batches wait)."""
        return self.unsent >= MAX_UNSENT

    @property
    def hungry(self) -> bool:
        """Whether it could take a lease now."""
        return not (self.closed or self.draining or self.backed_up) and self.free_credits > 0


def _covers(drained: Session, session: Session) -> bool:
    """Whether `drained` serves every stage `session` does (so `session` would find nothing that
    `drained` found no more of)."""
    return drained.workflow.name == session.workflow.name and (
        session.stage_quota.keys() <= drained.stage_quota.keys()
    )


def _split_seconds(epoch_seconds: float) -> tuple[int, int]:
    """Epoch seconds as a Timestamp's (seconds, nanos)."""
    whole = math.floor(epoch_seconds)
    return whole, min(999_999_999, round((epoch_seconds - whole) * 1e9))


def lease_batch(tasks: list[LeasedTask]) -> pb.WorkResponse:
    """The WorkResponse pushing `tasks`; the encoded runs are merged without re-encoding."""
    response = pb.WorkResponse()
    batch = response.leases
    batch.SetInParent()
    # A batch's deadlines and creation times repeat (one claim, tasks made by one completion).
    splits: dict[float, tuple[int, int]] = {}
    for task in tasks:
        lease = batch.leases.add(
            task_id=str(task.task_id),
            lease_id=task.lease_id,
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            stage=task.stage,
            collection_id=task.collection_id,
            priority=task.priority,
        )
        # Timestamp fields set directly: FromNanoseconds is pure Python and validates.
        deadline, created = lease.deadline, lease.create_time
        split = splits.get(task.deadline)
        if split is None:
            split = splits[task.deadline] = _split_seconds(task.deadline)
        deadline.seconds, deadline.nanos = split
        split = splits.get(task.created_at)
        if split is None:
            split = splits[task.created_at] = _split_seconds(task.created_at)
        created.seconds, created.nanos = split
        lease.agent_run.MergeFromString(task.run_data)
        if task.input:
            lease.input.MergeFromString(task.input)
    return response


class Dispatcher:
    """Matches ready tasks to sessions. `start()` runs the loop; `close_streams()` ends every
    session as a server shutting down does; `stop()` ends the loop."""

    def __init__(
        self,
        storage: Storage,
        metrics: OrchestratorMetrics,
        notifier: Notifier | None = None,
        *,
        poll_interval_seconds: float = POLL_INTERVAL_SECONDS,
        sweep_interval_seconds: float = SWEEP_INTERVAL_SECONDS,
        resume_grace_seconds: float = RESUME_GRACE_SECONDS,
        max_leases_per_key: int = 20_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server_id = uuid.uuid4().hex
        """This server process, as its heartbeat names it."""
        self.resume_grace_seconds = resume_grace_seconds
        self._storage = storage
        self._metrics = metrics
        self._owns_notifier = notifier is None
        self._notifier = notifier or LocalNotifier()
        self._poll_interval = poll_interval_seconds
        self._sweep_interval = sweep_interval_seconds
        self._clock = clock
        self.max_leases_per_key = max_leases_per_key
        self.key_held: dict[str, int] = {}
        """Leases held per API key, over this process's sessions (`max_leases_per_key`)."""
        self._sessions: list[Session] = []
        self._by_id: dict[str, Session] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._turn = itertools.count()
        self._closing = False
        self._all_removed = asyncio.Event()

    async def start(self) -> None:
        """Vouch for this server, start hearing notices, and start the dispatch loop."""
        await self._heartbeat()
        self._notifier.subscribe(on_ready=self.wake, on_revoked=self.on_revoked)
        if self._owns_notifier:
            await self._notifier.start()
        self._task = asyncio.create_task(self._run(), name="agentrun-dispatcher")

    async def close_streams(self) -> None:
        """End every session as a shutting-down server does: no new leases or sessions; each
        worker is asked to reconnect (`Reconnect`), and its stream ends once it closes its side
        (so nothing either side wrote is lost), else UNAVAILABLE after RECONNECT_WAIT_SECONDS. The
        leases stay leased, for the workers to resume elsewhere (or here, after a restart)."""
        self._closing = True
        for session in list(self._sessions):
            session.draining = session.reconnecting = True
            session.outbox.put_nowait(pb.WorkResponse(reconnect=pb.Reconnect()))
        if not await self._all_sessions_removed(RECONNECT_WAIT_SECONDS):
            for session in list(self._sessions):
                session.outbox.put_nowait(
                    Unavailable(
                        "the server is shutting down: reconnect and resume your leases", 0.5
                    )
                )
            await self._all_sessions_removed(CLOSE_STREAMS_TIMEOUT_SECONDS)

    async def _all_sessions_removed(self, timeout_seconds: float) -> bool:
        if not self._sessions:
            return True
        self._all_removed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_seconds):
                await self._all_removed.wait()
        return not self._sessions

    async def stop(self) -> None:
        """Stop the loop (and the notices, if it made its own notifier), and forget this server (its detached leases wait
        for their workers as any others do)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._owns_notifier:
            await self._notifier.close()
        with contextlib.suppress(Exception):
            await self._storage.remove_server(self.server_id)

    def wake(self) -> None:
        """Ask for a dispatch pass soon (something may have become ready or credits freed)."""
        self._wakeup.set()

    def tasks_ready(self, workflow: str, stages: Sequence[str]) -> None:
        """This process made tasks ready: a pass here, and a notice to the others."""
        self._notifier.tasks_ready(workflow, stages)
        self.wake()

    async def snapshot(self) -> tuple[list[StageBacklog], dict[str, int]]:
        """Every stage's backlog, and free credits per workflow (for the metrics collector)."""
        credits: dict[str, int] = {}
        for session in self._sessions:
            if not (session.closed or session.draining):
                name = session.workflow.name
                credits[name] = credits.get(name, 0) + session.free_credits
        return await self._storage.backlog("", self._clock()), credits

    async def add(self, session: Session, resume: Sequence[LeaseRef] = ()) -> list[Ack]:
        """Start dispatching to a session; attach the leases its worker resumes (answered per
        item: OK with the deadline, or why not).

        Raises:
            Unavailable: the server is shutting down.
        """
        if self._closing:
            raise Unavailable("the server is shutting down: connect to another", 0.5)
        session.key_held = self.key_held
        acks: list[Ack] = []
        if resume:
            now = self._clock()
            acks = await self._storage.resume(session.id, self.server_id, resume, now)
            for ack in acks:
                if ack.code == 0:
                    session.hold(ack.lease_id, now)
        self._sessions.append(session)
        self._by_id[session.id] = session
        self._metrics.workers.inc()
        self.wake()
        return acks

    async def remove(self, session: Session, handback: bool) -> None:
        """Stop dispatching to a session. `handback` (the worker closed its stream): its leases
        end at once, the attempts counted; else they are detached, for the worker to resume."""
        session.closed = True
        self._by_id.pop(session.id, None)
        if session in self._sessions:
            self._sessions.remove(session)
            self._metrics.workers.dec()
        try:
            now = self._clock()
            if handback:
                ended = await self._storage.release_session(session.id, now)
                if ended:
                    dead = self._count_ended(ended, "stream_closed")
                    _log.info(
                        "session %s closed holding %d leases: %d tasks ready again, %d dead",
                        session.id,
                        len(ended),
                        len(ended) - dead,
                        dead,
                    )
            else:
                detached = await self._storage.detach_session(session.id, now)
                if detached:
                    _log.info(
                        "session %s ended holding %d leases: kept %.0f s for its worker to resume",
                        session.id,
                        detached,
                        self.resume_grace_seconds,
                    )
        finally:
            if not self._sessions:
                self._all_removed.set()
            self.wake()

    def revoked(self, leases: Sequence[EndedLease], reason: str) -> None:
        """This process revoked leases (cancelled): tell their streams, wherever they are."""
        self._notifier.leases_revoked(
            [
                Revocation(e.task_id, e.lease_id, e.session_id, reason)
                for e in leases
                if e.session_id
            ]
        )

    def on_revoked(self, revocations: Sequence[Revocation]) -> None:
        """Tell the sessions here holding these leases that they are taken back, and free their
        credits (a worker may never settle a lease it has lost). Others' leases are ignored."""
        revoked: dict[str, list[pb.RevokedLease]] = {}
        for item in revocations:
            session = self._by_id.get(item.session_id)
            if session is None or session.drop(item.lease_id) is None:
                continue
            revoked.setdefault(session.id, []).append(
                pb.RevokedLease(
                    task_id=str(item.task_id),
                    lease_id=item.lease_id,
                    reason=_REVOKE_REASONS.get(item.reason, pb.REVOKE_REASON_UNSPECIFIED),
                )
            )
        for session_id, items in revoked.items():
            self._by_id[session_id].outbox.put_nowait(
                pb.WorkResponse(revoked=pb.LeasesRevoked(leases=items))
            )
        if revoked:
            self.wake()

    def _count_ended(self, ended: list[EndedLease], reason: str) -> int:
        """Count dead letters among leases the server ended; return how many."""
        dead = [lease for lease in ended if lease.dead]
        for lease in dead:
            self._metrics.child(self._metrics.dead, lease.workflow, lease.stage, reason).inc()
        return len(dead)

    def _claim_request(self, session: Session, limit: int) -> ClaimRequest:
        limit = min(limit, MAX_CLAIM_TASKS, self._key_room(session))
        return ClaimRequest(
            session.id,
            session.workflow.name,
            {s: min(limit, n) for s, n in session.stage_quota.items()},
            limit,
            session.lease_seconds,
            max(1, min(session.max_batch_bytes, session.free_bytes)),
            self.server_id,
        )

    async def complete(
        self, session: Session, completions: list[Completion], now: float
    ) -> tuple[list[Ack], list[LeasedTask]]:
        """Complete a session's tasks and, in the same transaction, lease it as many new ones as
        that frees credits (the dispatcher's pass would, one storage round later), unless a
        stream holding fewer leases waits for the same stages: then the pass serves that one
        first (fairness).

        The caller acks first, then pushes the leases with `push`.
        """
        if (
            session.claiming
            or session.closed
            or session.draining
            or session.backed_up
            or self._hungrier_than(session, len(completions))
        ):
            return await self._storage.complete(completions, now, session.id), []
        freed = sum(1 for c in completions if c.lease_id in session.in_flight)
        session.claiming = True
        try:
            return await self._storage.complete_and_claim(
                completions, self._claim_request(session, session.free_credits + freed), now
            )
        finally:
            session.claiming = False

    async def push(self, session: Session, tasks: list[LeasedTask], now: float) -> None:
        """Send leases claimed for a session; a session closed meanwhile hands them back."""
        if not tasks:
            return
        if session.closed:
            await self._storage.release(
                [Release(t.task_id, t.lease_id) for t in tasks], now, session.id
            )
            self.wake()
            return
        self._deliver(session, tasks, now)

    def sent(self, session: Session) -> None:
        """A lease batch queued for a session was taken by its stream's writer: it reads again."""
        session.unsent -= 1
        if session.unsent == MAX_UNSENT - 1:
            self.wake()

    def _key_room(self, session: Session) -> int:
        """Leases the session's API key may still take (`max_leases_per_key`)."""
        if not session.key:
            return MAX_CLAIM_TASKS
        return max(0, self.max_leases_per_key - self.key_held.get(session.key, 0))

    def _hungrier_than(self, session: Session, freed: int) -> bool:
        """Whether another session that could take the same tasks waits for them (its last
        claim found too few) while holding fewer leases than `session` will once `freed` settle.
        With tasks to spare for all, nobody waits, and settles claim their next at once."""
        held = len(session.in_flight) - freed
        return any(
            other is not session
            and other.starved
            and other.competes_with(session)
            and other.hungry
            and len(other.in_flight) < held
            for other in self._sessions
        )

    async def _heartbeat(self) -> None:
        await self._storage.heartbeat(
            self.server_id, socket.gethostname(), os.getpid(), self._clock()
        )

    async def _sweep(self, now: float) -> None:
        await self._heartbeat()
        expired, recovered = await self._storage.sweep(now, self.resume_grace_seconds)
        for lease in expired:
            self._metrics.child(self._metrics.expired, lease.workflow, lease.stage).inc()
        self._count_ended(expired, "lease_expired")
        self._count_ended(recovered, "not_resumed")
        if recovered:
            _log.info(
                "%d leases not resumed within %.0f s of their streams ending: ready again or dead",
                len(recovered),
                self.resume_grace_seconds,
            )
        self.on_revoked(
            [
                Revocation(e.task_id, e.lease_id, e.session_id, "expired")
                for e in expired
                if e.session_id
            ]
        )
        if expired or recovered:
            self.wake()

    async def _run(self) -> None:
        next_sweep = 0.0
        while True:
            # asyncio.timeout, not wait_for: on 3.11, wait_for swallows a cancellation that
            # arrives as the wakeup fires, and stop() would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                now = self._clock()
                if now >= next_sweep:
                    next_sweep = now + self._sweep_interval
                    await self._sweep(now)
                await self._pass(now)
            except Exception:
                _log.exception("dispatch pass failed; retrying")
                await asyncio.sleep(self._poll_interval)

    async def _pass(self, now: float) -> None:
        sessions = self._sessions
        if not sessions:
            return
        start = next(self._turn) % len(sessions)
        # Fairness: the sessions holding the fewest leases claim first (rotated among equals), so
        # a newcomer gets the next ready tasks before a stream that holds many.
        order = sorted(sessions[start:] + sessions[:start], key=lambda s: len(s.in_flight))
        drained: list[Session] = []  # found fewer ready tasks than they could take
        for session in order:
            if session.closed or session.draining or session.claiming or session.backed_up:
                continue
            free = min(session.free_credits, self._key_room(session))
            if free == 0:
                continue
            if any(_covers(other, session) for other in drained):
                # A task made ready during this pass goes to the next one, whose order gives it
                # to the stream holding fewest, not to this busier one.
                continue
            request = self._claim_request(session, free)
            session.claiming = True
            try:
                tasks = await self._storage.claim(request, now)
            finally:
                session.claiming = False
            if session.closed:
                # Closed while claiming: hand the tasks straight back, at no attempt cost.
                await self.push(session, tasks, now)
                continue
            session.starved = len(tasks) < request.limit
            if session.starved and min(session.stage_quota.values()) == UNLIMITED:
                drained.append(session)
            if tasks:
                self._deliver(session, tasks, now)
                if len(tasks) < free:  # cut short by max_batch_bytes, maybe: another pass soon
                    self.wake()
            elif (
                session.notify_when_empty
                and not session.in_flight
                and not session.empty_sent
                and not await self._storage.has_active(
                    session.workflow.name, list(session.stage_quota)
                )
            ):
                session.empty_sent = True
                session.outbox.put_nowait(pb.WorkResponse(stages_empty=pb.StagesEmpty()))

    def _deliver(self, session: Session, tasks: list[LeasedTask], now: float) -> None:
        metrics, workflow = self._metrics, session.workflow.name
        per_stage: dict[str, int] = {}
        for task in tasks:
            session.hold(
                task.lease_id, now, len(task.run_data) + (len(task.input) if task.input else 0)
            )
            if session.stage_quota[task.stage] != UNLIMITED:
                session.stage_quota[task.stage] -= 1
            per_stage[task.stage] = per_stage.get(task.stage, 0) + 1
            metrics.child(metrics.queue_wait, workflow, task.stage).observe(
                max(0.0, now - task.created_at)
            )
        for stage, count in per_stage.items():
            metrics.child(metrics.leased, workflow, stage).inc(count)
        session.empty_sent = False
        session.unsent += 1
        session.outbox.put_nowait(lease_batch(tasks))
