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
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence

from agentrun_server._errors import Unavailable
from agentrun_server.orchestrator._metrics import OrchestratorMetrics
from agentrun_server.orchestrator._session import WorkSession
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
)

_log = logging.getLogger(__name__)

MAX_CLAIM_TASKS = 1000
"""The most tasks one claim leases: a session with more free credits gets further batches, each
pass bounded however many credits it was granted."""
POLL_INTERVAL_SECONDS = 0.25
SWEEP_INTERVAL_SECONDS = 1.0
RESUME_GRACE_SECONDS = 15.0
"""How long a lease detached from its stream waits for its worker to resume it."""
RECONNECT_WAIT_SECONDS = 2.0
"""How long a shutting-down server waits for asked workers to close their streams themselves."""
CLOSE_STREAMS_TIMEOUT_SECONDS = 3.0


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
        self._sessions: list[WorkSession] = []
        self._by_id: dict[str, WorkSession] = {}
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
            session.ask_to_reconnect()
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

    async def add(self, session: WorkSession, resume: Sequence[LeaseRef] = ()) -> list[Ack]:
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
            acks = await self._storage.resume(session.holder, self.server_id, resume, now)
            for ack in acks:
                if ack.code == 0:
                    session.hold(ack.lease_id, now)
        self._sessions.append(session)
        self._by_id[session.id] = session
        self._metrics.workers.inc()
        self.wake()
        return acks

    async def remove(self, session: WorkSession, handback: bool) -> None:
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
                ended = await self._storage.end_session_leases(session.id, now)
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
        by_session: dict[str, list[Revocation]] = {}
        for item in revocations:
            by_session.setdefault(item.session_id, []).append(item)
        freed = False
        for session_id, items in by_session.items():
            session = self._by_id.get(session_id)
            if session is not None:
                freed |= bool(session.revoke(items))
        if freed:
            self.wake()

    def _count_ended(self, ended: list[EndedLease], reason: str) -> int:
        """Count dead letters among leases the server ended; return how many."""
        dead = [lease for lease in ended if lease.dead]
        for lease in dead:
            self._metrics.child(self._metrics.dead, lease.workflow, lease.stage, reason).inc()
        return len(dead)

    def _claim_request(self, session: WorkSession, limit: int) -> ClaimRequest:
        return session.claim_request(
            min(limit, MAX_CLAIM_TASKS, self._key_room(session)), self.server_id
        )

    async def complete(
        self, session: WorkSession, completions: list[Completion], now: float
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

    async def push(self, session: WorkSession, tasks: list[LeasedTask], now: float) -> None:
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

    def sent(self, session: WorkSession) -> None:
        """A lease batch queued for a session was taken by its stream's writer."""
        if session.sent():  # it reads again: lease it more
            self.wake()

    def _key_room(self, session: WorkSession) -> int:
        """Leases the session's API key may still take (`max_leases_per_key`)."""
        if not session.key:
            return MAX_CLAIM_TASKS
        return max(0, self.max_leases_per_key - self.key_held.get(session.key, 0))

    def _hungrier_than(self, session: WorkSession, freed: int) -> bool:
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
                await self._pass(now)
                if now >= next_sweep:
                    next_sweep = now + self._sweep_interval
                    await self._sweep(now)
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
        drained: list[WorkSession] = []  # found fewer ready tasks than they could take
        for session in order:
            if session.closed or session.draining or session.claiming or session.backed_up:
                continue
            free = min(session.free_credits, self._key_room(session))
            if free == 0:
                continue
            if any(other.covers(session) for other in drained):
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
            if session.starved and session.uncapped:
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
                session.empty()

    def _deliver(self, session: WorkSession, tasks: list[LeasedTask], now: float) -> None:
        metrics, workflow = self._metrics, session.workflow.name
        for task in tasks:
            metrics.child(metrics.queue_wait, workflow, task.stage).observe(
                max(0.0, now - task.created_at)
            )
        for stage, count in session.take(tasks, now).items():
            metrics.child(metrics.leased, workflow, stage).inc(count)
