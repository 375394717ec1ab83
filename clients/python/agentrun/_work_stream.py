"""`WorkStream`: the worker's half of the Work protocol (`OrchestratorService.Work`), kept across
reconnects. The `Runner` is built on it; a worker in another language follows what it does:

    async with WorkStream(None, "grading", ["triage"], credits=8) as stream:
        async for lease in stream:          # pushed by the server as tasks become ready
            ...
            stream.complete(lease, "solved")   # queued: batched with others, acked later

- **Credits**: the server pushes at most `credits` leases not yet settled.
- **Settles** (complete, fail, release) are queued and written in batches: what is queued while
  a write is in flight goes out in the next message, one message per kind. Each message gets one
  `AckBatch`, in order.
- **Extensions**: a lease still held when half of it has passed is extended by its duration.
- **Heartbeats**: a stream with nothing written for a third of the server's idle timeout
  (`Subscribed.idle_timeout`) writes a `heartbeat`, so an idle worker keeps its stream.
- **Revocations**: a lease the server takes back (cancelled, expired) is dropped, and
  `on_revoked(lease, reason)` called: its task must stop, and is never settled.
- **Drain**: `drain()` is written before any release queued after it, so the server stops pushing
  before the handed-back tasks are ready again (it would push them straight back).
- **Reconnect and resume**: a server shutting down asks for a reconnect (`Reconnect`): the stream
  stops writing, closes its side and reads to the end, so nothing written either way is lost. A
  stream that ends so, or breaks (UNAVAILABLE: a server gone, or the network), is opened again
  with backoff, to the same address (any replica). The
  leases still held are presented in `Subscribe.resume` and go on; settles not yet acknowledged
  are sent again (a repeat is answered as the first was). A lease the server does not resume is
  treated as revoked.
- **Close**: `close()` hands back leases never handed out, waits for the acks of what was settled,
  then closes its side of the stream: the server ends whatever is still held at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2

from agentrun._connection import Connection
from agentrun._errors import RpcError
from agentrun._retry import Backoff, retry_delay_seconds
from agentrun.v1 import agent_run_pb2
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc

_log = logging.getLogger(__name__)

RECONNECT_BACKOFF = Backoff(initial_seconds=0.5, max_seconds=5.0)
EXTEND_CHECK_SECONDS = 1.0
_FINAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Codes that end the stream for good: the subscription itself is wrong, and another attempt
would be answered the same. Every other code is a reconnect: UNAVAILABLE, and also INTERNAL,
UNKNOWN or CANCELLED, with which a server killed mid-write can end a stream (grpc/grpc#36066),
DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (a per-host cap on streams)."""
LOUD_EVERY = 10
"""Attempts in a row after which a failing reconnect is logged again at WARNING."""
CLOSE_SECONDS = 5.0
"""How long `close()` waits for the server to acknowledge what was settled and end the stream."""
_SETTLES = ("complete_tasks", "fail_tasks", "release_tasks")
_VERBS = {"complete_tasks": "completion", "release_tasks": "release"}
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]

OnRevoked = Callable[[pb.Lease, str], None]


@dataclass
class HeldLease:
    """A lease this worker holds and has not settled: when it ends, and how long to extend it by."""

    lease: pb.Lease
    deadline: float
    """Epoch seconds."""
    duration: float
    """Seconds: the lease's length when granted, used for each extension."""
    extending: bool = False


def _seconds(timestamp: Any) -> float:
    return float(timestamp.ToNanoseconds()) / 1e9


class WorkStream:
    """One worker's Work session with the orchestrator, across reconnects.

    Args:
        server: The orchestrator: a `Connection`, or a server URL as `Client` takes it (None:
            $AGENTRUN_SERVER or the default); its API key and metadata go with the stream.
        workflow: The workflow whose stages are served.
        stages: The stages served.
        credits: Leases held at once (leased and not yet settled).
        max_tasks_per_stage: Take at most this many tasks of each stage in all (None: no limit).
        notify_when_empty: End the iteration once the stages hold no task and nothing is held.
        on_revoked: Called with a lease the server took back and why ("cancelled", "expired",
            "not resumed: ..."); the lease is already dropped.
        worker: A name for the server's logs; default `host/pid-N`.
        reconnect: Delays between attempts to open a broken stream again.
    """

    def __init__(
        self,
        server: Connection | str | None,
        workflow: str,
        stages: Sequence[str],
        credits: int,
        *,
        max_tasks_per_stage: int | None = None,
        notify_when_empty: bool = False,
        on_revoked: OnRevoked | None = None,
        worker: str | None = None,
        reconnect: Backoff = RECONNECT_BACKOFF,
    ) -> None:
        self.workflow = workflow
        self.stages = list(stages)
        self.credits = credits
        self.max_tasks = max_tasks_per_stage
        self.held: dict[str, HeldLease] = {}
        """Task id -> the lease held (handed out or not, not yet settled)."""
        self.leased: collections.Counter[str] = collections.Counter()
        """Leases received per stage, over every stream."""
        self.subscribed: pb.Subscribed | None = None
        """The server's answer to the last subscribe (the workflow, as the server has it)."""
        self._connection = (
            server if isinstance(server, Connection) else Connection(server_url=server)
        )
        self._notify_when_empty = notify_when_empty
        self._on_revoked = on_revoked
        self._worker = worker or f"{socket.gethostname()}/pid-{os.getpid()}"
        self._reconnect = reconnect
        self._ready: collections.deque[pb.Lease] = collections.deque()
        self._changed = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._pending: dict[str, list[Any]] = {kind: [] for kind in (*_SETTLES, "extend_leases")}
        self._written: collections.deque[tuple[str, list[Any]]] = collections.deque()
        """Messages written on the current stream and not yet acked: (kind, items)."""
        self._resent: set[tuple[str, str]] = set()
        self._drain_pending = False
        self._draining = False
        self._empty = False
        self._closing = False
        self._call: Any = None
        self._task: asyncio.Task[None] | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._started = asyncio.Event()
        self._streamed = False  # the current stream got as far as `subscribed`
        self._out_of_reach = False  # a reconnect was reported and has not succeeded yet
        self._reconnect_asked = False  # the server asked this stream's worker to reconnect
        self._last_write = 0.0  # monotonic time of the last message written
        self._heartbeat_due = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the stream; return once subscribed (an unreachable server is retried).

        Raises:
            RpcError: the server refused the subscription (e.g. NOT_FOUND: no such workflow).
        """
        self._task = asyncio.create_task(self._run(), name="agentrun-work-stream")
        await self._started.wait()
        self._raise_if_failed()

    async def close(self) -> None:
        """Hand back leases never handed out, send what is queued, close this side of the
        stream, and read to its end (the acks of what was settled), a few seconds at most.
        Idempotent."""
        if self._closing:
            return
        self._closing = True
        for lease in self._ready:
            self.release(lease)
        self._ready.clear()
        self._wake_writer.set()  # the writer sends what is queued, then closes our side
        task = self._task
        if task is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await asyncio.shield(task)
        if self._unsettled():
            _log.warning(
                "closed with %d settles the server has not acknowledged", self._unsettled()
            )
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def __aenter__(self) -> WorkStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- leases in, settles out -----------------------------------------------------------------

    def __aiter__(self) -> WorkStream:
        return self

    async def __anext__(self) -> pb.Lease:
        """The next lease. The iteration ends when nothing is held and the server said the
        stages are empty (with `notify_when_empty`), or every stage's quota is taken, or after
        `drain()` or `close()`.

        Raises:
            RpcError: the stream failed for good.
        """
        while True:
            self._raise_if_failed()
            if self._ready:
                return self._ready.popleft()
            if self._closing and self._failed():
                raise StopAsyncIteration
            if not self.held and (
                self._empty or self._draining or self._closing or self._quota_reached()
            ):
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()

    def holds(self, lease: pb.Lease) -> bool:
        """Whether `lease` is still this worker's to settle (not settled, revoked or lost)."""
        held = self.held.get(lease.task_id)
        return held is not None and held.lease.lease_id == lease.lease_id

    def complete(
        self, lease: pb.Lease, pathway: str, output: agent_run_pb2.Value | None = None
    ) -> None:
        """Queue the completion of a held lease with a pathway ("" at a terminal stage)."""
        completion = pb.TaskCompletion(
            task_id=lease.task_id, lease_id=lease.lease_id, pathway=pathway
        )
        if output is not None:
            completion.output.CopyFrom(output)
        self._settle(lease, "complete_tasks", completion)

    def fail(
        self,
        lease: pb.Lease,
        error: str,
        non_retryable: bool = False,
        retry_after_seconds: float | None = None,
    ) -> None:
        """Queue the failure of a held lease's attempt (retried by the server unless
        `non_retryable` or its attempts are spent)."""
        failure = pb.TaskFailure(
            task_id=lease.task_id,
            lease_id=lease.lease_id,
            error=error,
            non_retryable=non_retryable,
        )
        if retry_after_seconds is not None:
            failure.retry_after.FromNanoseconds(int(retry_after_seconds * 1e9))
        self._settle(lease, "fail_tasks", failure)

    def release(self, lease: pb.Lease, after_seconds: float | None = None) -> None:
        """Queue the hand-back of a held lease: ready again at once (or after `after_seconds`),
        no attempt spent."""
        release = pb.TaskRelease(task_id=lease.task_id, lease_id=lease.lease_id)
        if after_seconds:
            release.retry_after.FromNanoseconds(int(after_seconds * 1e9))
        self._settle(lease, "release_tasks", release)

    def drain(self) -> None:
        """Ask for no more leases; the iteration ends once nothing is held."""
        if not self._draining:
            self._draining = self._drain_pending = True
            self._wake_writer.set()
            self._changed.set()

    def _settle(self, lease: pb.Lease, kind: str, item: Any) -> None:
        if not self.holds(lease):
            _log.debug("task %s: not settled, its lease is no longer held", lease.task_id)
            return
        del self.held[lease.task_id]
        self._pending[kind].append(item)
        self._wake_writer.set()
        self._changed.set()

    def _unsettled(self) -> int:
        return sum(len(self._pending[k]) for k in _SETTLES) + sum(
            len(items) for kind, items in self._written if kind in _SETTLES
        )

    def _quota_reached(self) -> bool:
        return self.max_tasks is not None and all(
            self.leased[s] >= self.max_tasks for s in self.stages
        )

    def _failed(self) -> bool:
        return self._error is not None or (self._task is not None and self._task.done())

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RpcError.from_grpc(self._error) from self._error
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]  # a bug of ours: never hide it

    # --- the stream, reopened until closed ------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                self._streamed = False
                error: grpc.aio.AioRpcError | None = None
                try:
                    await self._stream()
                except grpc.aio.AioRpcError as exc:
                    error = exc
                if self._closing:
                    return
                if self._streamed:  # it was up: start the schedule over
                    attempt = 0
                    if self._out_of_reach:
                        self._out_of_reach = False
                        _log.info("reconnected to the orchestrator")
                if error is not None and error.code() in _FINAL:
                    self._error = error
                    return
                attempt += 1
                delay = self._reconnect.delay(
                    attempt,
                    None if error is None else retry_delay_seconds(error),  # type: ignore[arg-type]  # an AioRpcError is a grpc.Call
                )
                if error is not None:
                    why = f"broke ({error.code().name}: {error.details()})"
                else:
                    why = "ended: the server is shutting down" if self._reconnect_asked else "ended"
                # Said once per outage (and each time the server asks), and again every
                # LOUD_EVERY attempts: not at every attempt.
                level = logging.WARNING if attempt % LOUD_EVERY == 1 else logging.DEBUG
                self._out_of_reach = True
                _log.log(
                    level,
                    "orchestrator stream %s; reconnecting in the background (next in %.1f s), "
                    "%d leases held",
                    why,
                    delay,
                    len(self.held),
                )
                await asyncio.sleep(delay)
        finally:
            self._started.set()
            self._changed.set()

    async def _stream(self) -> None:
        self._reconnect_asked = False
        async with self._connection.aio_channel() as channel:
            # Written to with call.write(); grpc-stubs 1.53 wants a request iterator.
            call: Any = pb_grpc.OrchestratorServiceStub(channel).Work(  # type: ignore[call-arg]
                metadata=self._connection.call_metadata()
            )
            resumed = [held.lease for held in self.held.values()]
            # A call that ended already raises InvalidStateError here; the read raises its status.
            with contextlib.suppress(asyncio.InvalidStateError):
                await call.write(pb.WorkRequest(subscribe=self._subscribe(resumed)))
            first: pb.WorkResponse = await call.read()
            if first is grpc.aio.EOF:  # type: ignore[attr-defined]  # not in grpc-stubs
                return
            self._on_subscribed(first.subscribed, resumed)
            self._call = call
            self._streamed = True
            self._started.set()
            self._last_write = time.monotonic()
            writer = asyncio.create_task(self._write_loop(call))
            extender = asyncio.create_task(self._extend_loop())
            idle = first.subscribed.idle_timeout
            heartbeat = asyncio.create_task(
                self._heartbeat_loop((idle.seconds + idle.nanos / 1e9) / 3)
                if first.subscribed.HasField("idle_timeout")
                else asyncio.sleep(0)
            )
            try:
                while True:
                    response: pb.WorkResponse = await call.read()
                    if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                        return
                    self._on_response(response)
            finally:
                self._call = None
                writer.cancel()
                extender.cancel()
                heartbeat.cancel()
                await asyncio.gather(writer, extender, heartbeat, return_exceptions=True)
                self._changed.set()

    def _subscribe(self, resumed: list[pb.Lease]) -> pb.Subscribe:
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
        return pb.Subscribe(
            workflow=self.workflow,
            stages=stages or [pb.StageSubscription(stage=s) for s in self.stages],
            credits=self.credits,
            worker=self._worker,
            notify_when_empty=self._notify_when_empty,
            resume=[
                pb.LeaseRef(task_id=lease.task_id, lease_id=lease.lease_id) for lease in resumed
            ],
        )

    def _on_subscribed(self, subscribed: pb.Subscribed, resumed: list[pb.Lease]) -> None:
        self.subscribed = subscribed
        for lease, ack in zip(resumed, subscribed.resumed, strict=False):
            held = self.held.get(lease.task_id)
            if held is None or held.lease.lease_id != lease.lease_id:
                continue  # settled meanwhile: the settle goes out below
            if ack.code == 0:
                held.deadline = _seconds(ack.deadline)
                held.extending = False
            else:
                self._revoke(held, f"not resumed: {ack.message}")
        if resumed:
            _log.info(
                "resumed %d of %d leases on the new stream",
                sum(1 for ack in subscribed.resumed if ack.code == 0),
                len(resumed),
            )
        # What the last stream wrote and never heard back about goes again: a repeat is
        # answered as the first was. Extensions are redone by the extender.
        for kind, items in self._written:
            if kind in _SETTLES:
                self._pending[kind][:0] = items
                self._resent.update((i.task_id, i.lease_id) for i in items)
        self._written.clear()
        self._drain_pending = self._draining  # a new session knows nothing of the old drain
        self._wake_writer.set()
        self._changed.set()

    def _on_response(self, response: pb.WorkResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "leases":
            received = time.time()
            for lease in response.leases.leases:
                self.leased[lease.stage] += 1
                deadline = _seconds(lease.deadline)
                self.held[lease.task_id] = HeldLease(lease, deadline, max(0.0, deadline - received))
                if self.max_tasks is not None and self.leased[lease.stage] > self.max_tasks:
                    self.release(lease)  # over this worker's quota (see _subscribe)
                else:
                    self._ready.append(lease)
            self._empty = False
        elif kind == "acks":
            self._on_acks(response.acks)
        elif kind == "revoked":
            for item in response.revoked.leases:
                held = self.held.get(item.task_id)
                if held is not None and held.lease.lease_id == item.lease_id:
                    reason = pb.RevokeReason.Name(item.reason).removeprefix("REVOKE_REASON_")
                    self._revoke(held, reason.lower())
        elif kind == "stages_empty":
            self._empty = True
        elif kind == "reconnect":  # the server is shutting down: close our side, read to the end
            self._reconnect_asked = True
            self._wake_writer.set()
        self._changed.set()

    def _revoke(self, held: HeldLease, reason: str) -> None:
        del self.held[held.lease.task_id]
        with contextlib.suppress(ValueError):
            self._ready.remove(held.lease)
        if self._on_revoked is not None:
            self._on_revoked(held.lease, reason)

    def _on_acks(self, batch: pb.AckBatch) -> None:
        if not self._written:
            _log.warning("an ack batch with no settle message awaiting it; ignored")
            return
        kind, _ = self._written.popleft()
        for ack in batch.acks:
            held = self.held.get(ack.task_id)
            mine = held is not None and held.lease.lease_id == ack.lease_id
            if kind == "extend_leases" and held is not None and mine:
                held.extending = False
                if ack.code == 0:
                    held.deadline = _seconds(ack.deadline)
            resent = (ack.task_id, ack.lease_id) in self._resent
            self._resent.discard((ack.task_id, ack.lease_id))
            if ack.code == _INVALID and kind in ("complete_tasks", "release_tasks"):
                # Refused as malformed, the lease is still held on the server: fail the attempt
                # with the server's reason rather than leave it leased until it expires.
                _log.error("task %s: the server refused its %s: %s", ack.task_id, kind, ack.message)
                self._pending["fail_tasks"].append(
                    pb.TaskFailure(
                        task_id=ack.task_id,
                        lease_id=ack.lease_id,
                        error=f"the server refused the worker's {_VERBS[kind]}: {ack.message}",
                        non_retryable=kind == "complete_tasks",
                    )
                )
                self._wake_writer.set()
            elif ack.code != 0 and not resent:
                _log.warning("task %s: the server refused: %s", ack.task_id, ack.message)
            elif ack.code != 0:
                _log.debug("task %s: resent settle refused: %s", ack.task_id, ack.message)

    async def _write_loop(self, call: Any) -> None:
        """Write what is queued, merged into one message per kind (batching)."""
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            if self._reconnect_asked:  # what is queued now goes on the next stream
                await call.done_writing()
                return
            # A drain goes first: the server must stop pushing before the leases handed back
            # with it are ready again, or it would push them straight back here.
            if self._drain_pending:
                self._drain_pending = False
                await self._write(call, pb.WorkRequest(drain=pb.Drain()))
            for kind in (*_SETTLES, "extend_leases"):
                items, self._pending[kind] = self._pending[kind], []
                if not items:
                    continue
                self._written.append((kind, items))  # before writing: a broken write is resent
                request = pb.WorkRequest()
                getattr(request, kind).SetInParent()
                field = {
                    "complete_tasks": "completions",
                    "fail_tasks": "failures",
                    "release_tasks": "releases",
                    "extend_leases": "extensions",
                }[kind]
                getattr(getattr(request, kind), field).extend(items)
                await self._write(call, request)
            if self._heartbeat_due:  # nothing else was written for a while
                await self._write(call, pb.WorkRequest(heartbeat=pb.Heartbeat()))
            self._changed.set()
            if self._closing:  # all written: the server acks it, hands back the rest, ends
                await call.done_writing()
                return

    async def _write(self, call: Any, request: pb.WorkRequest) -> None:
        await call.write(request)
        self._last_write = time.monotonic()
        self._heartbeat_due = False

    async def _heartbeat_loop(self, interval_seconds: float) -> None:
        """Ask the writer for a heartbeat when nothing was written for `interval_seconds`."""
        interval_seconds = max(0.05, interval_seconds)
        while True:
            quiet = time.monotonic() - self._last_write
            if quiet >= interval_seconds:
                self._heartbeat_due = True
                self._wake_writer.set()
                quiet = 0.0
            await asyncio.sleep(interval_seconds - quiet)

    async def _extend_loop(self) -> None:
        """Extend the leases still held once half of each is used up."""
        for held in self.held.values():
            held.extending = False  # an extension sent on a broken stream is lost
        while True:
            shortest = min((h.duration for h in self.held.values()), default=60.0)
            await asyncio.sleep(min(EXTEND_CHECK_SECONDS, max(0.05, shortest / 4)))
            now = time.time()
            for held in self.held.values():
                if not held.extending and held.deadline - now < held.duration / 2:
                    held.extending = True
                    duration = duration_pb2.Duration()
                    duration.FromNanoseconds(int(held.duration * 1e9))
                    self._pending["extend_leases"].append(
                        pb.LeaseExtension(
                            task_id=held.lease.task_id,
                            lease_id=held.lease.lease_id,
                            lease_duration=duration,
                        )
                    )
                    self._wake_writer.set()
