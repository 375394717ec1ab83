"""The OrchestratorService servicer: workflows, the Work stream, task operations, backlog."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc
from agentrun.v1 import workflow_pb2 as workflow_pb
from agentrun.wire.limits import (
    MAX_LEASE_SECONDS,
    MAX_STAGES,
)
from agentrun_server._checks import (
    check_count,
    check_enum,
    check_name,
    check_reference,
    check_seconds,
    check_task_id,
    check_task_ids,
    lease_id_problem,
)
from agentrun_server._errors import InvalidArgument, NotFound
from agentrun_server.auth import Access, audit, caller
from agentrun_server.orchestrator import _wire as wire
from agentrun_server.orchestrator._dispatcher import Dispatcher
from agentrun_server.orchestrator._metrics import OrchestratorMetrics
from agentrun_server.orchestrator._session import UNLIMITED, Leased, WorkSession
from agentrun_server.orchestrator._wire import (
    MAX_ITEMS_PER_MESSAGE,
    TASK_STATES_FROM_PROTO,
    task_to_proto,
    workflow_from_proto,
    workflow_to_proto,
)
from agentrun_server.serving import (
    IdleTimeout,
    StreamSlots,
    add_service,
    page_after,
    page_size,
    receive,
    to_duration,
    to_timestamp,
)
from agentrun_server.storage import (
    Ack,
    Completion,
    LeasedTask,
    LeaseRef,
    StageBacklog,
    Storage,
)

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
_TASK_STATES = tuple(workflow_pb.TaskState.values())


CLOSE_CONFIRM_SECONDS = 0.2
"""How long after a worker's requests end the server waits for a cancellation (a connection
broken, not closed) before taking the close as the worker's own: its leases go back at once."""
READ_AHEAD = 64
"""Requests of a Work stream read ahead of the one being handled, at most."""
READ_AHEAD_BYTES = 256 * 1024
"""Their encoded bytes beyond the first, at most."""
_ITEMS = {"complete_tasks": "completions", "fail_tasks": "failures", "release_tasks": "releases"}
DEFAULT_BATCH_BYTES = 3 * 1024 * 1024
"""Encoded bytes per lease batch when the worker's Subscribe names no `max_batch_bytes`: under
gRPC's default 4 MiB receive limit, so a client built with defaults can read every batch (a run
larger than that comes alone, and needs the client's limit raised)."""


@dataclass(frozen=True)
class WorkLimits:
    """What one Work stream may hold, so that no worker can take the whole backlog or the
    server's memory. The defaults are far above what a Runner asks for."""

    max_credits: int = 10_000
    """Leases one stream may hold at once: `subscribe.credits` plus grants. A larger subscribe is
    INVALID_ARGUMENT; grants beyond it are cut to it."""
    max_leased_bytes: int = 256 * 1024 * 1024
    """Encoded bytes of leases (runs and inputs) one stream may hold unsettled; above it the
    stream gets no more leases until it settles some."""
    max_streams: int = 2048
    """Work streams open at once in all; one more is answered RESOURCE_EXHAUSTED with RetryInfo."""
    max_streams_per_peer: int = 256
    """Work streams open at once from one client host (its IP address); one more is answered
    RESOURCE_EXHAUSTED with RetryInfo."""
    max_streams_per_key: int = 1024
    """Work streams open at once under one API key (hosts behind one NAT share an address)."""
    first_message_seconds: float = 10.0
    """A stream whose `subscribe` does not arrive within this is ended DEADLINE_EXCEEDED."""
    idle_seconds: float = 60.0
    """A subscribed stream whose worker sends nothing for this long is ended DEADLINE_EXCEEDED
    (its leases kept for a resume); `Subscribed.idle_timeout` tells the worker, which sends a
    heartbeat when it has nothing else to say."""
    lease_window: int = 1000
    """Fairness: a stream holds at most this many leases beyond those it has settled on it (up to
    its credits), so a stream that takes leases and never settles them holds this many at most,
    while a working one grows to its credits at once."""
    max_leases_per_key: int = 20_000
    """Leases held at once by all the streams of one API key."""


async def _with_refusals(
    messages: Sequence[tuple[Sequence[T], dict[int, Ack]]],
    settle: Callable[[list[T]], Awaitable[list[Ack]]],
) -> list[list[Ack]]:
    """Settle the items not refused of several messages (each its items and refusals) in one
    call; each message's answers, in its items' order."""
    kept = [item for items, refused in messages for i, item in enumerate(items) if i not in refused]
    stored = iter(await settle(kept) if kept else [])
    return [
        [refused.get(i) or next(stored) for i in range(len(items))] for items, refused in messages
    ]


class _Inbox:
    """A Work stream's requests read ahead of the one being handled: at most READ_AHEAD of
    them, and READ_AHEAD_BYTES beyond the first (flow control holds the rest, as it holds a
    stream nobody reads): a worker cannot make the server buffer more by sending faster. Then
    None, or the error that ended the stream."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[pb.WorkRequest | BaseException | None, int]] = (
            collections.deque()
        )
        self._bytes = 0
        self._changed = asyncio.Event()

    async def read(self, requests: AsyncIterator[pb.WorkRequest], idle: IdleTimeout) -> None:
        """Read the stream to its end."""
        try:
            async for request in requests:
                idle.touch()
                await self._put(request, request.ByteSize())
            await self._put(None, 0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._put(exc, 0)

    async def _put(self, item: pb.WorkRequest | BaseException | None, size: int) -> None:
        while self._items and (
            len(self._items) >= READ_AHEAD or self._bytes + size > READ_AHEAD_BYTES
        ):
            self._changed.clear()
            await self._changed.wait()
        self._items.append((item, size))
        self._bytes += size
        self._changed.set()

    async def get(self) -> pb.WorkRequest | BaseException | None:
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        return self.take()

    def take(self) -> pb.WorkRequest | BaseException | None:
        """The next item, read already (see `peek`)."""
        item, size = self._items.popleft()
        self._bytes -= size
        self._changed.set()
        return item

    def peek(self) -> pb.WorkRequest | BaseException | None:
        """The next item if it was read already (else None, as at the stream's end)."""
        return self._items[0][0] if self._items else None


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    """Serves `agentrun.v1.OrchestratorService` over a `Storage`, pushing through a Dispatcher.

    `max_message_bytes` is the server's message limit: lease batches stay within half of it.
    """

    def __init__(
        self,
        storage: Storage,
        dispatcher: Dispatcher,
        metrics: OrchestratorMetrics,
        max_message_bytes: int = 64 * 1024 * 1024,
        limits: WorkLimits | None = None,
        access: Access | None = None,
    ) -> None:
        self._storage = storage
        self._access = access or Access(storage)
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._max_batch_bytes = max_message_bytes // 2  # room for the leases' other fields
        self.limits = limits or WorkLimits()
        limits = self.limits
        # Settles take every message of their kind already read after the first (see _read).
        self._settles: dict[str, Callable[[WorkSession, list[Any]], Awaitable[None]]] = {
            "complete_tasks": self._on_complete,
            "fail_tasks": self._on_fail,
            "release_tasks": self._on_release,
        }
        self._handlers: dict[str, Callable[[WorkSession, Any], Awaitable[None]]] = {
            "extend_leases": self._on_extend,
            "grant_credits": self._on_grant,
            "drain": self._on_drain,
            "heartbeat": self._on_heartbeat,
        }
        self._slots = StreamSlots(
            "Work streams",
            ("max_streams", limits.max_streams),
            ("max_streams_per_peer", limits.max_streams_per_peer),
            per_key=("max_streams_per_key", limits.max_streams_per_key),
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve this servicer on `server`; the Work stream's lease batches go out as `_wire`
        encoded them (`encode_response`)."""
        add_service(
            server,
            self,
            pb.DESCRIPTOR.services_by_name["OrchestratorService"],
            response_serializers={"Work": wire.encode_response},
        )

    # --- workflows ------------------------------------------------------------------------------

    async def ApplyWorkflow(
        self, request: pb.ApplyWorkflowRequest, context: Context
    ) -> pb.ApplyWorkflowResponse:
        workflow = workflow_from_proto(request.workflow)
        workflow.validate()
        caller().check_workflow(workflow.name, "workflow.name")
        stored, changed, cancelled = await self._storage.put_workflow(
            workflow, time.time(), request.force
        )
        count = cancelled.cancelled if cancelled else 0
        audit(
            "workflow.apply",
            workflow=stored.name,
            version=stored.version,
            changed=changed,
            **({"forced": True, "cancelled": count} if request.force else {}),
        )
        if cancelled:
            self._dispatcher.revoked(cancelled.ended, "cancelled")
        return pb.ApplyWorkflowResponse(
            workflow=workflow_to_proto(stored), changed=changed, cancelled_count=count
        )

    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Context
    ) -> pb.GetWorkflowResponse:
        name = check_reference("name", request.name, required=True)
        caller().check_workflow(name, "name")
        await self._check_names(name)
        workflow = await self._storage.get_workflow(name)
        return pb.GetWorkflowResponse(workflow=workflow_to_proto(workflow))

    async def _check_names(self, workflow: str, stage: str = "") -> None:
        """That `workflow` (and `stage`, if given) exist, so a misspelling is NOT_FOUND naming
        what does, not an empty answer.

        Raises:
            NotFound: no such workflow (listing those the caller may see) or stage (listing the
                workflow's stages).
        """
        if not workflow:
            return
        try:
            found = await self._storage.get_workflow(workflow)
        except NotFound:
            principal = caller()
            names = [
                w.name
                for w in await self._storage.list_workflows()
                if principal.sees_workflow(w.name)
            ]
            known = ", ".join(repr(n) for n in names) if names else "none applied yet"
            raise NotFound(
                f"workflow: no workflow named {workflow!r}; workflows: {known}"
            ) from None
        if stage:
            found.stage(stage)

    async def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: Context
    ) -> pb.ListWorkflowsResponse:
        principal = caller()
        workflows = [
            w for w in await self._storage.list_workflows() if principal.sees_workflow(w.name)
        ]
        return pb.ListWorkflowsResponse(workflows=[workflow_to_proto(w) for w in workflows])

    async def EnqueueAgentRuns(
        self, request: pb.EnqueueAgentRunsRequest, context: Context
    ) -> pb.EnqueueAgentRunsResponse:
        run_ids = check_count("agent_run_ids", request.agent_run_ids)
        for i, run_id in enumerate(run_ids):
            check_reference(f"agent_run_ids[{i}]", run_id, required=True)
        workflow = check_reference("workflow", request.workflow, required=True)
        # The runs' collections too: the workflow's workers receive the runs in their leases.
        await self._access.check("agent_run_ids", workflow=workflow, run_ids=run_ids)
        stage = check_reference("stage", request.stage)
        await self._check_names(workflow, stage)
        enqueued, skipped = await self._storage.enqueue(
            workflow,
            stage,
            list(run_ids),
            request.priority,
            time.time(),
        )
        audit(
            "runs.enqueue",
            workflow=workflow,
            stage=request.stage,
            runs=len(run_ids),
            enqueued=enqueued,
            skipped=skipped,
        )
        if enqueued:
            self._dispatcher.tasks_ready(request.workflow, [request.stage] if request.stage else [])
        return pb.EnqueueAgentRunsResponse(enqueued_count=enqueued, skipped_count=skipped)

    # --- the Work stream ------------------------------------------------------------------------

    async def Work(  # type: ignore[override]  # lease batches go out encoded (add_to_server)
        self, request_iterator: AsyncIterator[pb.WorkRequest], context: Context
    ) -> AsyncIterator[pb.WorkResponse | bytes]:
        with self._slots.slot(context.peer(), caller().name):
            async for response in self._work(request_iterator):
                yield response

    async def _work(
        self, request_iterator: AsyncIterator[pb.WorkRequest]
    ) -> AsyncIterator[pb.WorkResponse | bytes]:
        requests = aiter(request_iterator)
        first = await receive(
            requests,
            min(self.limits.first_message_seconds, self.limits.idle_seconds),
            "first_message_seconds: a Work stream subscribes at once",
        )
        if first is None:
            return
        if first.WhichOneof("kind") != "subscribe":
            raise InvalidArgument("the first WorkRequest must be `subscribe`")
        session = await self._open(first.subscribe)
        resume = [
            LeaseRef(wire.task_id(ref.task_id), ref.lease_id)
            if lease_id_problem("lease_id", ref.lease_id) is None
            else LeaseRef(0, "")  # no such lease: answered NOT_FOUND
            for ref in check_count("subscribe.resume", first.subscribe.resume)
        ]
        resumed = await self._dispatcher.add(session, resume)
        handback = False  # the worker closed its side: its leases end now; else they wait
        reader: asyncio.Task[None] | None = None
        try:
            yield wire.subscribed(session.id, session.workflow, resumed, self.limits.idle_seconds)
            reader = asyncio.create_task(self._read(session, requests))
            while True:
                item = await session.outbox.get()
                if item is None:
                    if session.reconnecting:  # closed as asked: it resumes elsewhere
                        return
                    # The requests ended: the worker closed its side, or its connection broke.
                    # gRPC reports both alike, and a broken one's cancellation only follows: it
                    # comes here within milliseconds, as a CancelledError, and detaches.
                    await asyncio.sleep(CLOSE_CONFIRM_SECONDS)
                    handback = True
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Leased):
                    self._dispatcher.sent(session)
                yield wire.response(item)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            # Shielded: the stream may be ending because it was cancelled.
            await asyncio.shield(self._dispatcher.remove(session, handback))

    async def _open(self, subscribe: pb.Subscribe) -> WorkSession:
        limits = self.limits
        if not 1 <= subscribe.credits <= limits.max_credits:
            raise InvalidArgument(
                f"subscribe.credits: {subscribe.credits}; must be 1 to {limits.max_credits:,} "
                "(leases held at once by one stream)"
            )
        lease_seconds = None
        if subscribe.HasField("lease_duration"):
            lease_seconds = check_seconds(
                "subscribe.lease_duration",
                subscribe.lease_duration,
                0.0,
                MAX_LEASE_SECONDS,
                open_min=True,
            )
        worker = check_name("subscribe.worker", subscribe.worker) if subscribe.worker else ""
        if not subscribe.stages:
            raise InvalidArgument("subscribe.stages: at least one stage is required")
        check_count("subscribe.stages", subscribe.stages, MAX_STAGES)
        name = check_reference("subscribe.workflow", subscribe.workflow, required=True)
        await self._access.check("subscribe.workflow", workflow=name)
        workflow = await self._storage.get_workflow(name)
        quota = {}
        for i, stage in enumerate(subscribe.stages):
            workflow.stage(check_reference(f"subscribe.stages[{i}].stage", stage.stage))
            if stage.stage in quota:
                raise InvalidArgument(f"subscribe.stages[{i}]: stage {stage.stage!r} given twice")
            quota[stage.stage] = stage.max_tasks or UNLIMITED
        return WorkSession(
            id=uuid.uuid4().hex,
            key=caller().name,
            window=limits.lease_window,
            worker=worker,
            workflow=workflow,
            stage_quota=quota,
            credits=subscribe.credits,
            lease_seconds=lease_seconds,
            notify_when_empty=subscribe.notify_when_empty,
            max_batch_bytes=min(
                subscribe.max_batch_bytes or DEFAULT_BATCH_BYTES, self._max_batch_bytes
            ),
            max_leased_bytes=limits.max_leased_bytes,
        )

    async def _read(self, session: WorkSession, requests: AsyncIterator[pb.WorkRequest]) -> None:
        """Handle a stream's requests in order. Settle messages of one kind that arrived while
        the one before was being stored are stored together, in one transaction, each still
        answered by its own ack batch: a worker that settles each task as it finishes (the Go
        and C++ workers, sync stage functions) would otherwise cost a transaction per task."""
        why = "idle_timeout: a worker with nothing to settle sends a heartbeat"
        inbox = _Inbox()
        try:
            with IdleTimeout(self.limits.idle_seconds, why) as idle:
                reader = asyncio.create_task(inbox.read(requests, idle))
                try:
                    await self._handle_all(session, inbox)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
            session.outbox.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            session.outbox.put_nowait(exc)

    async def _handle_all(self, session: WorkSession, inbox: _Inbox) -> None:
        while True:
            request = await inbox.get()
            if request is None:
                return
            if isinstance(request, BaseException):
                raise request
            kind = request.WhichOneof("kind") or ""
            settle = self._settles.get(kind)
            if settle is not None:
                batch = [getattr(request, kind)]
                items = _ITEMS[kind]
                count = len(getattr(batch[0], items))
                while isinstance(following := inbox.peek(), pb.WorkRequest):
                    more = (
                        getattr(following, kind) if following.WhichOneof("kind") == kind else None
                    )
                    if more is None or count + len(getattr(more, items)) > MAX_ITEMS_PER_MESSAGE:
                        break
                    inbox.take()
                    batch.append(more)
                    count += len(getattr(more, items))
                await settle(session, batch)
                continue
            handle = self._handlers.get(kind)
            if handle is None:
                raise InvalidArgument(
                    "WorkRequest.subscribe: only allowed as the first message"
                    if kind == "subscribe"
                    else "WorkRequest.kind: not set, or not known to this server"
                )
            await handle(session, getattr(request, kind))

    # One handler per kind of WorkRequest: (the session, the request's `kind` message; a list of
    # them for settles).

    async def _on_complete(self, session: WorkSession, requests: list[pb.CompleteTasks]) -> None:
        now = time.time()
        messages = [wire.completions(request) for request in requests]
        leased: list[LeasedTask] = []

        async def settle(kept: list[Completion]) -> list[Ack]:
            acks, next_leases = await self._dispatcher.complete(session, kept, now)
            leased.extend(next_leases)
            return acks

        answers = await _with_refusals(messages, settle)
        metrics, workflow = self._metrics, session.workflow.name
        done: dict[tuple[str, str], int] = {}
        for (completions, _), acks in zip(messages, answers, strict=True):
            for item, ack in zip(completions, acks, strict=True):
                if ack.result == "done":
                    key = (ack.stage, item.pathway)
                    done[key] = done.get(key, 0) + 1
                    leased_at = session.in_flight.get(ack.lease_id)
                    if leased_at is not None:
                        metrics.child(metrics.run_seconds, workflow, ack.stage).observe(
                            max(0.0, now - leased_at)
                        )
            session.on_settled("complete_tasks", acks)
        for (stage, pathway), count in done.items():
            metrics.child(metrics.completed, workflow, stage, pathway).inc(count)
        if leased:
            await self._dispatcher.push(session, leased, now)
        self._dispatcher.wake()

    async def _on_fail(self, session: WorkSession, requests: list[pb.FailTasks]) -> None:
        now = time.time()
        answers = await _with_refusals(
            [wire.failures(request) for request in requests],
            lambda kept: self._storage.fail(kept, now, session.id),
        )
        metrics, workflow = self._metrics, session.workflow.name
        for acks in answers:
            for ack in acks:
                if ack.result in ("retry", "dead"):
                    metrics.child(metrics.failed, workflow, ack.stage, ack.result).inc()
                if ack.result == "dead":
                    metrics.child(metrics.dead, workflow, ack.stage, "failed").inc()
            session.on_settled("fail_tasks", acks)
        self._dispatcher.wake()

    async def _on_extend(self, session: WorkSession, request: pb.ExtendLeases) -> None:
        now = time.time()
        (acks,) = await _with_refusals(
            [wire.extensions(request, session.lease_seconds)],
            lambda kept: self._storage.extend(kept, now, session.id),
        )
        session.on_settled("extend_leases", acks)

    async def _on_release(self, session: WorkSession, requests: list[pb.ReleaseTasks]) -> None:
        now = time.time()
        answers = await _with_refusals(
            [wire.releases(request) for request in requests],
            lambda kept: self._storage.release(kept, now, session.id),
        )
        for acks in answers:
            session.on_settled("release_tasks", acks)
        self._dispatcher.wake()

    async def _on_grant(self, session: WorkSession, request: pb.GrantCredits) -> None:
        session.grant(request.credits, self.limits.max_credits)
        self._dispatcher.wake()

    async def _on_drain(self, session: WorkSession, request: pb.Drain) -> None:
        session.drain()

    async def _on_heartbeat(self, session: WorkSession, request: pb.Heartbeat) -> None:
        pass

    # --- tasks ----------------------------------------------------------------------------------

    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        task_id = check_task_id("task_id", request.task_id)
        task = await self._storage.get_task(task_id)
        caller().check_workflow(task.workflow, "task_id")
        return pb.GetTaskResponse(task=task_to_proto(task))

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        after = page_after(request.page_token)
        size = page_size(request.page_size)
        check_enum("state", request.state, _TASK_STATES)
        state = TASK_STATES_FROM_PROTO.get(request.state)
        workflow = check_reference("workflow", request.workflow)
        run_id = check_reference("agent_run_id", request.agent_run_id)
        principal = caller()
        if run_id:
            # A run's tasks: the run's collection decides, then each task's workflow.
            await self._access.check("agent_run_id", run_ids=[run_id])
            if workflow:
                principal.check_workflow(workflow)
        else:
            principal.check_workflow(workflow)
        stage = check_reference("stage", request.stage)
        await self._check_names(workflow, stage)
        page, more = await self._storage.list_tasks(
            workflow,
            stage,
            state,
            after,
            size,
            self._max_batch_bytes,
            agent_run_id=run_id,
        )
        return pb.ListTasksResponse(
            tasks=[task_to_proto(t) for t in page if principal.sees_workflow(t.workflow)],
            next_page_token=str(page[-1].id) if more else "",
        )

    async def RedriveTasks(
        self, request: pb.RedriveTasksRequest, context: Context
    ) -> pb.RedriveTasksResponse:
        workflow = check_reference("workflow", request.workflow)
        caller().check_workflow(workflow)
        task_ids = check_task_ids("task_ids", request.task_ids)
        stage = check_reference("stage", request.stage)
        await self._check_names(workflow, stage)
        count = await self._storage.redrive(workflow, stage, task_ids, time.time())
        audit(
            "tasks.redrive", workflow=workflow, stage=request.stage, task_ids=task_ids, count=count
        )
        self._metrics.redriven.inc(count)
        self._dispatcher.wake()
        return pb.RedriveTasksResponse(redriven_count=count)

    async def CancelTasks(
        self, request: pb.CancelTasksRequest, context: Context
    ) -> pb.CancelTasksResponse:
        workflow = check_reference("workflow", request.workflow)
        caller().check_workflow(workflow)
        task_ids = check_task_ids("task_ids", request.task_ids)
        stage = check_reference("stage", request.stage)
        await self._check_names(workflow, stage)
        count, leases = await self._storage.cancel(workflow, stage, task_ids, time.time())
        audit(
            "tasks.cancel", workflow=workflow, stage=request.stage, task_ids=task_ids, count=count
        )
        self._dispatcher.revoked(leases, "cancelled")
        return pb.CancelTasksResponse(cancelled_count=count)

    async def _backlog_of(self, workflow: str, now: float) -> list[StageBacklog]:
        try:
            return await self._storage.backlog(workflow, now)
        except NotFound:  # a limit may name a workflow not applied yet
            return []

    async def GetBacklog(
        self, request: pb.GetBacklogRequest, context: Context
    ) -> pb.GetBacklogResponse:
        now = time.time()
        workflow = check_reference("workflow", request.workflow)
        principal = caller()
        if workflow or not principal.limited:
            principal.check_workflow(workflow)
            await self._check_names(workflow)
            stages = await self._storage.backlog(workflow, now)
        else:  # every workflow the key may see
            stages = [
                s for name in sorted(principal.workflows) for s in await self._backlog_of(name, now)
            ]
        return pb.GetBacklogResponse(
            time=to_timestamp(now),
            stages=[
                workflow_pb.StageBacklog(
                    workflow=s.workflow,
                    stage=s.stage,
                    ready_count=s.ready,
                    scheduled_count=s.scheduled,
                    leased_count=s.leased,
                    done_count=s.done,
                    dead_count=s.dead,
                    cancelled_count=s.cancelled,
                    oldest_ready_age=to_duration(s.oldest_ready_age_seconds),
                )
                for s in stages
            ],
        )
