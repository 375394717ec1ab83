"""The OrchestratorService servicer: workflows, the Work stream, task operations, backlog."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc
from agentrun.v1 import workflow_pb2 as workflow_pb
from agentrun_server._errors import InvalidArgument
from agentrun_server.orchestrator._convert import (
    TASK_STATES_FROM_PROTO,
    task_to_proto,
    workflow_from_proto,
    workflow_to_proto,
)
from agentrun_server.orchestrator._dispatcher import UNLIMITED, Dispatcher, Session
from agentrun_server.orchestrator._metrics import OrchestratorMetrics
from agentrun_server.serving import page_after, page_size, seconds_of, to_duration, to_timestamp
from agentrun_server.storage import (
    Ack,
    AckCode,
    Completion,
    Extension,
    Failure,
    LeasedTask,
    LeaseRef,
    Release,
    Storage,
    check_name,
)

Context = grpc.aio.ServicerContext[Any, Any]


MAX_OUTPUT_BYTES = 1024 * 1024
"""The largest encoded stage output a completion may carry: outputs are results (scores, labels,
summaries) that ride along as the next stage's input and in task listings, not payloads."""
MAX_ERROR_CHARS = 64 * 1024
"""Longer failure messages are stored clipped to this many characters (the tail is dropped)."""
CLOSE_CONFIRM_SECONDS = 0.2
"""How long after a worker's requests end the server waits for a cancellation (a connection
broken, not closed) before taking the close as the worker's own: its leases go back at once."""
DEFAULT_BATCH_BYTES = 16 * 1024 * 1024
"""Encoded bytes per lease batch when the worker's Subscribe names no `max_batch_bytes`."""


def _clip(error: str) -> str:
    if len(error) <= MAX_ERROR_CHARS:
        return error
    return error[:MAX_ERROR_CHARS] + f"... [clipped from {len(error):,} characters]"


def _task_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1  # no such task: answered NOT_FOUND per item


def _task_ids(texts: Sequence[str]) -> list[int]:
    ids = []
    for text in texts:
        try:
            ids.append(int(text))
        except ValueError:
            raise InvalidArgument(f"task_ids: {text!r} is not a task id") from None
    return ids


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
    ) -> None:
        self._storage = storage
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._max_batch_bytes = max_message_bytes // 2  # room for the leases' other fields

    # --- workflows ------------------------------------------------------------------------------

    async def ApplyWorkflow(
        self, request: pb.ApplyWorkflowRequest, context: Context
    ) -> pb.ApplyWorkflowResponse:
        workflow = workflow_from_proto(request.workflow)
        workflow.validate()
        stored, changed = await self._storage.put_workflow(workflow, time.time())
        return pb.ApplyWorkflowResponse(workflow=workflow_to_proto(stored), changed=changed)

    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Context
    ) -> pb.GetWorkflowResponse:
        workflow = await self._storage.get_workflow(request.name)
        return pb.GetWorkflowResponse(workflow=workflow_to_proto(workflow))

    async def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: Context
    ) -> pb.ListWorkflowsResponse:
        workflows = await self._storage.list_workflows()
        return pb.ListWorkflowsResponse(workflows=[workflow_to_proto(w) for w in workflows])

    async def EnqueueAgentRuns(
        self, request: pb.EnqueueAgentRunsRequest, context: Context
    ) -> pb.EnqueueAgentRunsResponse:
        enqueued, skipped = await self._storage.enqueue(
            request.workflow,
            request.stage,
            list(request.agent_run_ids),
            request.priority,
            time.time(),
        )
        if enqueued:
            self._dispatcher.tasks_ready(request.workflow, [request.stage] if request.stage else [])
        return pb.EnqueueAgentRunsResponse(enqueued_count=enqueued, skipped_count=skipped)

    # --- the Work stream ------------------------------------------------------------------------

    async def Work(
        self, request_iterator: AsyncIterator[pb.WorkRequest], context: Context
    ) -> AsyncIterator[pb.WorkResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("kind") != "subscribe":
            raise InvalidArgument("the first WorkRequest must be `subscribe`")
        session = await self._open(first.subscribe)
        resume = [LeaseRef(_task_id(ref.task_id), ref.lease_id) for ref in first.subscribe.resume]
        resumed = await self._dispatcher.add(session, resume)
        handback = False  # the worker closed its side: its leases end now; else they wait
        reader: asyncio.Task[None] | None = None
        try:
            subscribed = pb.WorkResponse(
                subscribed=pb.Subscribed(
                    session_id=session.id, workflow=workflow_to_proto(session.workflow)
                )
            )
            subscribed.subscribed.resumed.extend(self._ack_batch(resumed).acks.acks)
            yield subscribed
            reader = asyncio.create_task(self._read(session, request_iterator))
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
                yield item
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            # Shielded: the stream may be ending because it was cancelled.
            await asyncio.shield(self._dispatcher.remove(session, handback))

    async def _open(self, subscribe: pb.Subscribe) -> Session:
        workflow = await self._storage.get_workflow(subscribe.workflow)
        if not subscribe.stages:
            raise InvalidArgument("subscribe.stages: at least one stage is required")
        quota = {}
        for i, stage in enumerate(subscribe.stages):
            workflow.stage(stage.stage)
            if stage.stage in quota:
                raise InvalidArgument(f"subscribe.stages[{i}]: stage {stage.stage!r} given twice")
            quota[stage.stage] = stage.max_tasks or UNLIMITED
        if subscribe.credits < 1:
            raise InvalidArgument("subscribe.credits: must be at least 1")
        lease_seconds = None
        if subscribe.HasField("lease_duration"):
            lease_seconds = seconds_of(subscribe.lease_duration)
            if lease_seconds <= 0:
                raise InvalidArgument("subscribe.lease_duration: must be positive")
        return Session(
            id=uuid.uuid4().hex,
            worker=subscribe.worker,
            workflow=workflow,
            stage_quota=quota,
            credits=subscribe.credits,
            lease_seconds=lease_seconds,
            notify_when_empty=subscribe.notify_when_empty,
            max_batch_bytes=min(
                subscribe.max_batch_bytes or DEFAULT_BATCH_BYTES, self._max_batch_bytes
            ),
        )

    async def _read(self, session: Session, requests: AsyncIterator[pb.WorkRequest]) -> None:
        try:
            async for request in requests:
                await self._handle(session, request)
            session.outbox.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            session.outbox.put_nowait(exc)

    async def _handle(self, session: Session, request: pb.WorkRequest) -> None:
        kind = request.WhichOneof("kind")
        now = time.time()
        acks: list[Ack]
        leased: list[LeasedTask] = []
        if kind == "complete_tasks":
            completions = [
                Completion(
                    _task_id(c.task_id),
                    c.lease_id,
                    c.pathway,
                    c.output.SerializeToString() if c.HasField("output") else None,
                )
                for c in request.complete_tasks.completions
            ]
            acks, leased = await self._complete(session, completions, now)
            metrics, workflow = self._metrics, session.workflow.name
            done: dict[tuple[str, str], int] = {}
            for item, ack in zip(completions, acks, strict=True):
                if ack.result == "done":
                    key = (ack.stage, item.pathway)
                    done[key] = done.get(key, 0) + 1
                    leased_at = session.in_flight.get(ack.lease_id)
                    if leased_at is not None:
                        metrics.child(metrics.run_seconds, workflow, ack.stage).observe(
                            max(0.0, now - leased_at)
                        )
            for (stage, pathway), count in done.items():
                metrics.child(metrics.completed, workflow, stage, pathway).inc(count)
        elif kind == "fail_tasks":
            acks = await self._storage.fail(
                [
                    Failure(
                        _task_id(f.task_id),
                        f.lease_id,
                        _clip(f.error),
                        f.non_retryable,
                        seconds_of(f.retry_after) if f.HasField("retry_after") else None,
                    )
                    for f in request.fail_tasks.failures
                ],
                now,
            )
            metrics, workflow = self._metrics, session.workflow.name
            for ack in acks:
                if ack.result in ("retry", "dead"):
                    metrics.child(metrics.failed, workflow, ack.stage, ack.result).inc()
                if ack.result == "dead":
                    metrics.child(metrics.dead, workflow, ack.stage, "failed").inc()
        elif kind == "extend_leases":
            acks = await self._storage.extend(
                [
                    Extension(
                        _task_id(e.task_id),
                        e.lease_id,
                        seconds_of(e.lease_duration)
                        if e.HasField("lease_duration")
                        else session.lease_seconds,
                    )
                    for e in request.extend_leases.extensions
                ],
                now,
            )
        elif kind == "release_tasks":
            acks = await self._storage.release(
                [
                    Release(
                        _task_id(r.task_id),
                        r.lease_id,
                        max(0.0, seconds_of(r.retry_after)) if r.HasField("retry_after") else 0.0,
                    )
                    for r in request.release_tasks.releases
                ],
                now,
            )
        elif kind == "grant_credits":
            session.credits += request.grant_credits.credits
            self._dispatcher.wake()
            return
        elif kind == "drain":
            session.draining = True
            return
        else:
            raise InvalidArgument(f"WorkRequest.{kind}: only allowed as the first message")
        self._settled(session, acks, kind)
        session.outbox.put_nowait(self._ack_batch(acks))
        if leased:
            await self._dispatcher.push(session, leased, now)
        self._dispatcher.wake()

    async def _complete(
        self, session: Session, completions: list[Completion], now: float
    ) -> tuple[list[Ack], list[LeasedTask]]:
        """Complete through the dispatcher, refusing outputs over MAX_OUTPUT_BYTES item by item
        (INVALID_ARGUMENT: the lease is kept, so the worker can complete again)."""
        oversize = {
            i: Ack(
                c.task_id,
                c.lease_id,
                AckCode.INVALID_ARGUMENT,
                f"completions[{i}].output: {len(c.output):,} bytes encoded, over the "
                f"{MAX_OUTPUT_BYTES:,}-byte limit",
            )
            for i, c in enumerate(completions)
            if c.output is not None and len(c.output) > MAX_OUTPUT_BYTES
        }
        if not oversize:
            return await self._dispatcher.complete(session, completions, now)
        kept = [c for i, c in enumerate(completions) if i not in oversize]
        acks, leased = await self._dispatcher.complete(session, kept, now)
        stored = iter(acks)
        return [oversize.get(i) or next(stored) for i in range(len(completions))], leased

    @staticmethod
    def _settled(session: Session, acks: list[Ack], kind: str) -> None:
        """Free the credits of leases this stream no longer holds."""
        for ack in acks:
            still_held = ack.code == AckCode.OK and kind == "extend_leases"
            # A rejected pathway leaves the task leased: the worker can settle it again.
            still_held |= ack.code == AckCode.INVALID_ARGUMENT
            if not still_held:
                session.in_flight.pop(ack.lease_id, None)

    @staticmethod
    def _ack_batch(acks: list[Ack]) -> pb.WorkResponse:
        response = pb.WorkResponse()
        batch = response.acks
        batch.SetInParent()
        for ack in acks:
            out = batch.acks.add(
                task_id=str(ack.task_id),
                lease_id=ack.lease_id,
                code=int(ack.code),
                message=ack.message,
            )
            if ack.deadline is not None:
                out.deadline.CopyFrom(to_timestamp(ack.deadline))
            if ack.next_task_id is not None:
                out.next_task_id = str(ack.next_task_id)
        return response

    # --- tasks ----------------------------------------------------------------------------------

    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        (task_id,) = _task_ids([request.task_id])
        return pb.GetTaskResponse(task=task_to_proto(await self._storage.get_task(task_id)))

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        after = page_after(request.page_token)
        size = page_size(request.page_size)
        state = TASK_STATES_FROM_PROTO.get(request.state)
        page, more = await self._storage.list_tasks(
            request.workflow, request.stage, state, after, size, self._max_batch_bytes
        )
        return pb.ListTasksResponse(
            tasks=[task_to_proto(t) for t in page],
            next_page_token=str(page[-1].id) if more else "",
        )

    async def RedriveTasks(
        self, request: pb.RedriveTasksRequest, context: Context
    ) -> pb.RedriveTasksResponse:
        if request.workflow:
            check_name("workflow", request.workflow)
        count = await self._storage.redrive(
            request.workflow, request.stage, _task_ids(request.task_ids), time.time()
        )
        self._metrics.redriven.inc(count)
        self._dispatcher.wake()
        return pb.RedriveTasksResponse(redriven_count=count)

    async def CancelTasks(
        self, request: pb.CancelTasksRequest, context: Context
    ) -> pb.CancelTasksResponse:
        count, leases = await self._storage.cancel(
            request.workflow, request.stage, _task_ids(request.task_ids), time.time()
        )
        self._dispatcher.revoked(leases, "cancelled")
        return pb.CancelTasksResponse(cancelled_count=count)

    async def GetBacklog(
        self, request: pb.GetBacklogRequest, context: Context
    ) -> pb.GetBacklogResponse:
        now = time.time()
        stages = await self._storage.backlog(request.workflow, now)
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
