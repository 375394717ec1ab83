"""`WorkStream`: the Work protocol (`WorkProtocol`) driven over gRPC, kept across reconnects: one
task reads the server's messages into the protocol, another writes what the protocol says to,
and a broken stream is opened again with backoff. The Runner is built on it.

    async with WorkStream(None, "grading", ["triage"], credits=8) as stream:
        async for lease in stream:          # pushed by the server as tasks become ready
            ...
            stream.complete(lease, "solved")   # queued: batched with others, acked later
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from agentrun._connection import Connection
from agentrun._errors import RpcError
from agentrun._retry import Backoff, Failure, Verdict
from agentrun.v1 import agent_run_pb2
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc
from agentrun.work._protocol import HeldLease, Lease, WorkProtocol

_log = logging.getLogger(__name__)

RECONNECT_BACKOFF = Backoff(initial_seconds=0.5, max_seconds=5.0)
LOUD_EVERY = 10
"""Attempts in a row after which a failing reconnect is logged again at WARNING."""
CLOSE_SECONDS = 5.0
"""How long `close()` waits for the server to acknowledge what was settled and end the stream."""

OnRevoked = Callable[[Lease, str], None]


class WorkStream:
    """One worker's Work session with the orchestrator, across reconnects (see `WorkProtocol`
    for the rules it keeps).

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
        self.protocol = WorkProtocol(
            workflow,
            stages,
            credits,
            max_tasks_per_stage=max_tasks_per_stage,
            notify_when_empty=notify_when_empty,
            worker=worker or f"{socket.gethostname()}/pid-{os.getpid()}",
        )
        self._connection = (
            server if isinstance(server, Connection) else Connection(server_url=server)
        )
        self._on_revoked = on_revoked
        self._reconnect = reconnect
        self._changed = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._started = asyncio.Event()
        self._streamed = False  # the current stream got as far as `subscribed`
        self._half_closed = False  # the current stream's writer closed this side
        self._out_of_reach = False  # a reconnect was reported and has not succeeded yet

    @property
    def held(self) -> dict[str, HeldLease]:
        """Task id -> the lease held (handed out or not, not yet settled)."""
        return self.protocol.held

    @property
    def subscribed(self) -> pb.Subscribed | None:
        """The server's answer to the last subscribe (the workflow, as the server has it)."""
        return self.protocol.subscribed

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
        if self.protocol.closing:
            return
        self.protocol.close()
        self._wake_writer.set()  # the writer sends what is queued, then closes our side
        task = self._task
        if task is None:
            return
        # Done once every settle is acknowledged: the stream's end the server sends after that
        # is only confirmed a moment later (it tells a closed side from a broken connection).
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(CLOSE_SECONDS):
                while not task.done() and not self._all_acknowledged():
                    self._changed.clear()
                    await self._changed.wait()
        if self.protocol.unsettled:
            _log.warning(
                "closed with %d settles the server has not acknowledged", self.protocol.unsettled
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

    async def __anext__(self) -> Lease:
        """The next lease. The iteration ends when nothing is held and the server said the
        stages are empty (with `notify_when_empty`), or every stage's quota is taken, or after
        `drain()` or `close()`.

        Raises:
            RpcError: the stream failed for good.
        """
        protocol = self.protocol
        while True:
            self._raise_if_failed()
            if protocol.ready:
                return protocol.ready.popleft()
            if protocol.closing and self._failed():
                raise StopAsyncIteration
            if protocol.finished:
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` is still this worker's to settle (not settled, revoked or lost)."""
        return self.protocol.holds(lease)

    def complete(
        self, lease: Lease, pathway: str, output: agent_run_pb2.Value | None = None
    ) -> None:
        """Queue the completion of a held lease with a pathway ("" at a terminal stage)."""
        self._settled(self.protocol.complete(lease, pathway, output), lease)

    def fail(
        self,
        lease: Lease,
        error: str,
        non_retryable: bool = False,
        retry_after_seconds: float | None = None,
    ) -> None:
        """Queue the failure of a held lease's attempt (retried by the server unless
        `non_retryable` or its attempts are spent)."""
        self._settled(self.protocol.fail(lease, error, non_retryable, retry_after_seconds), lease)

    def release(self, lease: Lease, after_seconds: float | None = None) -> None:
        """Queue the hand-back of a held lease: ready again at once (or after `after_seconds`),
        no attempt spent."""
        self._settled(self.protocol.release(lease, after_seconds), lease)

    def drain(self) -> None:
        """Ask for no more leases; the iteration ends once nothing is held."""
        self.protocol.drain()
        self._wake_writer.set()
        self._changed.set()

    def _settled(self, queued: bool, lease: Lease) -> None:
        if not queued:
            _log.debug("task %s: not settled, its lease is no longer held", lease.task_id)
            return
        self._wake_writer.set()
        self._changed.set()

    def _all_acknowledged(self) -> bool:
        """Whether this side is closed and the server acknowledged every settle."""
        protocol = self.protocol
        return self._half_closed and not protocol.held and not protocol.unsettled

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
            while not self.protocol.closing:
                self._streamed = False
                error: grpc.aio.AioRpcError | None = None
                try:
                    await self._stream()
                except grpc.aio.AioRpcError as exc:
                    error = exc
                if self.protocol.closing:
                    return
                if self._streamed:  # it was up: start the schedule over
                    attempt = 0
                    if self._out_of_reach:
                        self._out_of_reach = False
                        _log.info("reconnected to the orchestrator")
                # The SDK's one retry policy: a stream ends for good only when refused.
                failure = None if error is None else Failure.of(error)
                if failure is not None and failure.verdict(stream=True) is Verdict.GIVE_UP:
                    self._error = error
                    return
                attempt += 1
                delay = self._reconnect.delay(
                    attempt, None if failure is None else failure.retry_after_seconds
                )
                if failure is not None:
                    why = f"broke ({failure})"
                else:
                    asked = self.protocol.reconnect_asked
                    why = "ended: the server is shutting down" if asked else "ended"
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
                    len(self.protocol.held),
                )
                await asyncio.sleep(delay)
        finally:
            self._started.set()
            self._changed.set()

    async def _stream(self) -> None:
        protocol = self.protocol
        async with self._connection.aio_channel() as channel:
            # Written to with call.write(); grpc-stubs 1.53 wants a request iterator.
            call: Any = pb_grpc.OrchestratorServiceStub(channel).Work(  # type: ignore[call-arg]
                metadata=self._connection.call_metadata()
            )
            resumed = protocol.resumable()
            # A call that ended already raises InvalidStateError here; the read raises its status.
            with contextlib.suppress(asyncio.InvalidStateError):
                await call.write(protocol.subscribe(time.time()))
            first: pb.WorkResponse = await call.read()
            if first is grpc.aio.EOF:  # type: ignore[attr-defined]  # not in grpc-stubs
                return
            self._revoked(protocol.on_subscribed(first.subscribed, resumed))
            if resumed:
                _log.info(
                    "resumed %d of %d leases on the new stream",
                    sum(1 for ack in first.subscribed.resumed if ack.code == 0),
                    len(resumed),
                )
            self._streamed = True
            self._half_closed = False
            self._started.set()
            writer = asyncio.create_task(self._write_loop(call))
            self._wake_writer.set()
            self._changed.set()
            try:
                while True:
                    response: pb.WorkResponse = await call.read()
                    if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                        return
                    self._revoked(protocol.on_response(response, time.time()))
                    self._log_refusals()
                    if protocol.reconnect_asked or response.HasField("acks"):
                        self._wake_writer.set()  # settles held back for this ack may go now
                    self._changed.set()
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                self._changed.set()

    def _revoked(self, revoked: list[tuple[Lease, str]]) -> None:
        for lease, reason in revoked:
            if self._on_revoked is not None:
                self._on_revoked(lease, reason)

    def _log_refusals(self) -> None:
        if not self.protocol.refusals:
            return
        for refusal in self.protocol.refusals:
            if refusal.code == 3 and refusal.kind in ("complete_tasks", "release_tasks"):
                _log.error(
                    "task %s: the server refused its %s: %s",
                    refusal.task_id,
                    refusal.kind,
                    refusal.message,
                )
            elif refusal.resent:
                _log.debug("task %s: resent settle refused: %s", refusal.task_id, refusal.message)
            else:
                _log.warning("task %s: the server refused: %s", refusal.task_id, refusal.message)
        self.protocol.refusals.clear()
        self._wake_writer.set()  # a refused completion's failure may be queued

    async def _write_loop(self, call: Any) -> None:
        """Write what the protocol says to: when woken (a settle queued, a drain, a close), or
        when an extension or a heartbeat comes due."""
        protocol = self.protocol
        while True:
            now = time.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, protocol.next_write_at(now) - now)):
                    await self._wake_writer.wait()
            self._wake_writer.clear()
            for request in protocol.outgoing(time.time()):
                await call.write(request)
            self._changed.set()
            if protocol.done_writing:  # all written: the server acks it and ends the stream
                await call.done_writing()
                self._half_closed = True
                self._changed.set()
                return
