"""The orchestrator's wire form, in one module: workflows and tasks between protobuf and storage
records; the Work stream's requests read into settle items (with the items refused before
storage), and a session's events written as `WorkResponse`s. The session and the dispatcher know
no protobuf."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from agentrun.v1 import orchestrator_service_pb2 as work_pb
from agentrun.v1 import workflow_pb2 as pb
from agentrun.wire.checks import proto_value_depth_problem
from agentrun.wire.framing import encode_lease_batch
from agentrun.wire.limits import (
    MAX_DELAY_SECONDS,
    MAX_IDENTIFIER_CHARS,
    MAX_IDS_PER_REQUEST,
    MAX_LEASE_SECONDS,
    MAX_OUTPUT_BYTES,
    shown,
)
from agentrun_server._checks import (
    check_count,
    duration_problem,
    lease_id_problem,
    parse_id,
    storable_text,
)
from agentrun_server.orchestrator._session import (
    Acked,
    Event,
    Leased,
    Reconnect,
    Revoked,
    StagesEmpty,
)
from agentrun_server.serving import seconds_of, to_duration, to_timestamp
from agentrun_server.storage import (
    Ack,
    AckCode,
    Completion,
    Extension,
    Failure,
    LeasedTask,
    LeaseHolder,
    Release,
    Revocation,
    StageDef,
    TaskRecord,
    TaskState,
    WorkflowDef,
)
from agentrun_server.storage._types import (
    DEFAULT_INITIAL_BACKOFF_SECONDS,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BACKOFF_SECONDS,
)

T = TypeVar("T")

TASK_STATES = {
    TaskState.READY: pb.TASK_STATE_READY,
    TaskState.LEASED: pb.TASK_STATE_LEASED,
    TaskState.DONE: pb.TASK_STATE_DONE,
    TaskState.DEAD: pb.TASK_STATE_DEAD,
    TaskState.CANCELLED: pb.TASK_STATE_CANCELLED,
}
TASK_STATES_FROM_PROTO = {v: k for k, v in TASK_STATES.items()}


def workflow_from_proto(workflow: pb.Workflow) -> WorkflowDef:
    """A definition from its wire form, server defaults filled in (not yet validated)."""
    stages = []
    for stage in workflow.stages:
        policy = stage.retry_policy
        stages.append(
            StageDef(
                name=stage.name,
                pathways={p.name: p.next_stage or None for p in stage.pathways},
                max_attempts=policy.max_attempts or DEFAULT_MAX_ATTEMPTS,
                initial_backoff_seconds=seconds_of(policy.initial_backoff)
                if policy.HasField("initial_backoff")
                else DEFAULT_INITIAL_BACKOFF_SECONDS,
                max_backoff_seconds=seconds_of(policy.max_backoff)
                if policy.HasField("max_backoff")
                else DEFAULT_MAX_BACKOFF_SECONDS,
                lease_seconds=seconds_of(stage.lease_duration)
                if stage.HasField("lease_duration")
                else DEFAULT_LEASE_SECONDS,
            )
        )
    return WorkflowDef(name=workflow.name, stages=tuple(stages))


def workflow_to_proto(workflow: WorkflowDef) -> pb.Workflow:
    """The wire form of a stored definition."""
    return pb.Workflow(
        name=workflow.name,
        version=workflow.version,
        update_time=to_timestamp(workflow.updated_at),
        stages=[
            pb.Stage(
                name=s.name,
                pathways=[pb.Pathway(name=p, next_stage=t or "") for p, t in s.pathways.items()],
                retry_policy=pb.RetryPolicy(
                    max_attempts=s.max_attempts,
                    initial_backoff=to_duration(s.initial_backoff_seconds),
                    max_backoff=to_duration(s.max_backoff_seconds),
                ),
                lease_duration=to_duration(s.lease_seconds),
            )
            for s in workflow.stages
        ],
    )


def task_to_proto(task: TaskRecord) -> pb.Task:
    """The wire form of a task."""
    out = pb.Task(
        id=str(task.id),
        workflow=task.workflow,
        stage=task.stage,
        agent_run_id=task.agent_run_id,
        collection_id=task.collection_id,
        state=TASK_STATES[task.state],
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        priority=task.priority,
        create_time=to_timestamp(task.created_at),
        ready_time=to_timestamp(task.ready_at),
        pathway=task.pathway or "",
        previous_task_id=str(task.previous_task_id or ""),
        failures=[
            pb.AttemptFailure(
                attempt=f.attempt,
                error=f.error,
                time=to_timestamp(f.failed_at),
                holder=_holder(f.holder),
            )
            for f in task.failures
        ],
    )
    held = _holder(task.holder)
    if held is not None and task.state in (TaskState.LEASED, TaskState.DONE):
        out.holder.CopyFrom(held)
    if task.lease_deadline is not None and task.state is TaskState.LEASED:
        out.lease_deadline.CopyFrom(to_timestamp(task.lease_deadline))
    if task.output:
        out.output.MergeFromString(task.output)
    if task.input:
        out.input.MergeFromString(task.input)
    return out


# --- the Work stream: requests in ----------------------------------------------------------------

MAX_ERROR_CHARS = 64 * 1024
"""Longer failure messages are stored clipped to this many characters (the tail is dropped)."""
MAX_ITEMS_PER_MESSAGE = MAX_IDS_PER_REQUEST
"""Most settles (completions, failures, extensions, releases) in one WorkRequest."""

Refused = dict[int, Ack]
"""Items refused before storage, by their index in the request: INVALID_ARGUMENT each, the
lease (if current) kept."""


def _holder(holder: LeaseHolder | None) -> pb.LeaseHolder | None:
    if holder is None:
        return None
    return pb.LeaseHolder(worker=holder.worker, key=holder.key, session_id=holder.session_id)


def _clip(error: str) -> str:
    error = storable_text(error)
    if len(error) <= MAX_ERROR_CHARS:
        return error
    return error[:MAX_ERROR_CHARS] + f"... [clipped from {len(error):,} characters]"


def task_id(text: str) -> int:
    """A settle's task id; 0 (no task has it: answered NOT_FOUND per item) if it is not one."""
    return parse_id(text) or 0


def _items(field: str, items: Sequence[T]) -> Sequence[T]:
    return check_count(field, items, MAX_ITEMS_PER_MESSAGE)


def _refuse(task: int, lease_id: str, message: str) -> Ack:
    return Ack(task, lease_id, AckCode.INVALID_ARGUMENT, message)


def _delay_problem(field: str, has: bool, duration: Any) -> str | None:
    if not has:
        return None
    problem = duration_problem(duration, 0.0, MAX_DELAY_SECONDS, open_min=False)
    return None if problem is None else f"{field}: {problem}"


def _completion_problem(i: int, c: work_pb.TaskCompletion, output: bytes | None) -> str | None:
    problem = lease_id_problem(f"completions[{i}].lease_id", c.lease_id)
    if problem is not None:
        return problem
    if len(c.pathway) > MAX_IDENTIFIER_CHARS or "\x00" in c.pathway:
        return (
            f"completions[{i}].pathway: {shown(c.pathway)} is not a pathway name (at most "
            f"{MAX_IDENTIFIER_CHARS} characters)"
        )
    if output is None:
        return None
    if len(output) > MAX_OUTPUT_BYTES:
        return (
            f"completions[{i}].output: {len(output):,} bytes encoded, over the "
            f"{MAX_OUTPUT_BYTES:,}-byte limit"
        )
    depth = proto_value_depth_problem(c.output)
    return depth and f"completions[{i}].output: {depth}"


def completions(request: work_pb.CompleteTasks) -> tuple[list[Completion], Refused]:
    """The completions, and those refused before storage: a pathway longer than any stage's,
    an output over MAX_OUTPUT_BYTES or nested deeper than the SDK's model allows.

    Raises:
        InvalidArgument: over MAX_ITEMS_PER_MESSAGE items.
    """
    items: list[Completion] = []
    refused: Refused = {}
    for i, c in enumerate(_items("complete_tasks.completions", request.completions)):
        output = c.output.SerializeToString() if c.HasField("output") else None
        item = Completion(task_id(c.task_id), c.lease_id, c.pathway, output)
        items.append(item)
        problem = _completion_problem(i, c, output)
        if problem:
            refused[i] = _refuse(item.task_id, item.lease_id, problem)
    return items, refused


def failures(request: work_pb.FailTasks) -> tuple[list[Failure], Refused]:
    """The failures, and those refused before storage: a retry_after out of range."""
    items: list[Failure] = []
    refused: Refused = {}
    for i, f in enumerate(_items("fail_tasks.failures", request.failures)):
        has = f.HasField("retry_after")
        item = Failure(
            task_id(f.task_id),
            f.lease_id,
            _clip(f.error),
            f.non_retryable,
            seconds_of(f.retry_after) if has else None,
        )
        problem = lease_id_problem(f"failures[{i}].lease_id", f.lease_id) or _delay_problem(
            f"failures[{i}].retry_after", has, f.retry_after
        )
        if problem:
            refused[i] = _refuse(item.task_id, item.lease_id, problem)
        items.append(item)
    return items, refused


def extensions(
    request: work_pb.ExtendLeases, lease_seconds: float | None
) -> tuple[list[Extension], Refused]:
    """The extensions (`lease_seconds` where one names no duration), and those refused before
    storage: a duration not positive or over MAX_LEASE_SECONDS."""
    items: list[Extension] = []
    refused: Refused = {}
    for i, e in enumerate(_items("extend_leases.extensions", request.extensions)):
        has = e.HasField("lease_duration")
        item = Extension(
            task_id(e.task_id), e.lease_id, seconds_of(e.lease_duration) if has else lease_seconds
        )
        problem = lease_id_problem(f"extensions[{i}].lease_id", e.lease_id)
        if has and not problem:
            problem = duration_problem(e.lease_duration, 0.0, MAX_LEASE_SECONDS, open_min=True)
            problem = problem and f"extensions[{i}].lease_duration: {problem}"
        if problem:
            refused[i] = _refuse(item.task_id, item.lease_id, problem)
        items.append(item)
    return items, refused


def releases(request: work_pb.ReleaseTasks) -> tuple[list[Release], Refused]:
    """The releases, and those refused before storage: a retry_after out of range."""
    items: list[Release] = []
    refused: Refused = {}
    for i, r in enumerate(_items("release_tasks.releases", request.releases)):
        has = r.HasField("retry_after")
        item = Release(task_id(r.task_id), r.lease_id, seconds_of(r.retry_after) if has else 0.0)
        problem = lease_id_problem(f"releases[{i}].lease_id", r.lease_id) or _delay_problem(
            f"releases[{i}].retry_after", has, r.retry_after
        )
        if problem:
            refused[i] = _refuse(item.task_id, item.lease_id, problem)
        items.append(item)
    return items, refused


# --- the Work stream: a session's events out -----------------------------------------------------

_REVOKE_REASONS = {
    "cancelled": work_pb.REVOKE_REASON_CANCELLED,
    "expired": work_pb.REVOKE_REASON_EXPIRED,
}


def _split_seconds(epoch_seconds: float) -> tuple[int, int]:
    """Epoch seconds as a Timestamp's (seconds, nanos)."""
    whole = math.floor(epoch_seconds)
    return whole, min(999_999_999, round((epoch_seconds - whole) * 1e9))


def lease_batch(tasks: list[LeasedTask]) -> bytes:
    """The encoded WorkResponse pushing `tasks`: each stored run (and input) is framed into it
    as stored, never decoded here (`agentrun.wire.framing.encode_lease_batch`)."""
    # A batch's deadlines and creation times repeat (one claim, tasks made by one completion).
    splits: dict[float, tuple[int, int]] = {}
    heads = []
    for task in tasks:
        lease = work_pb.Lease(
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
        heads.append((lease.SerializeToString(), task.run_data, task.input))
    return encode_lease_batch(heads)


def acks(items: Sequence[Ack]) -> list[work_pb.Ack]:
    """The wire form of settle answers."""
    out = []
    for ack in items:
        wire = work_pb.Ack(
            task_id=str(ack.task_id), lease_id=ack.lease_id, code=int(ack.code), message=ack.message
        )
        if ack.deadline is not None:
            wire.deadline.CopyFrom(to_timestamp(ack.deadline))
        if ack.next_task_id is not None:
            wire.next_task_id = str(ack.next_task_id)
        out.append(wire)
    return out


def revoked(items: Sequence[Revocation]) -> work_pb.WorkResponse:
    """The WorkResponse taking leases back."""
    return work_pb.WorkResponse(
        revoked=work_pb.LeasesRevoked(
            leases=[
                work_pb.RevokedLease(
                    task_id=str(r.task_id),
                    lease_id=r.lease_id,
                    reason=_REVOKE_REASONS.get(r.reason, work_pb.REVOKE_REASON_UNSPECIFIED),
                )
                for r in items
            ]
        )
    )


def response(event: Event) -> work_pb.WorkResponse | bytes:
    """The WorkResponse of a session's event (a lease batch already encoded: `encode_response`
    passes it through)."""
    if isinstance(event, Leased):
        return lease_batch(event.tasks)
    if isinstance(event, Acked):
        out = work_pb.WorkResponse()
        out.acks.SetInParent()
        out.acks.acks.extend(acks(event.acks))
        return out
    if isinstance(event, Revoked):
        return revoked(event.leases)
    if isinstance(event, StagesEmpty):
        return work_pb.WorkResponse(stages_empty=work_pb.StagesEmpty())
    if isinstance(event, Reconnect):
        return work_pb.WorkResponse(reconnect=work_pb.Reconnect())
    raise TypeError(f"not a session event: {event!r}")


def encode_response(message: work_pb.WorkResponse | bytes) -> bytes:
    """The Work method's response serializer: messages encoded, what `response` encoded itself
    passed through."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def subscribed(
    session_id: str, workflow: WorkflowDef, resumed: Sequence[Ack], idle_seconds: float
) -> work_pb.WorkResponse:
    """The answer to `subscribe`: the session, its workflow, each resumed lease's answer, and how
    long the server waits for the worker's next message."""
    return work_pb.WorkResponse(
        subscribed=work_pb.Subscribed(
            session_id=session_id,
            workflow=workflow_to_proto(workflow),
            resumed=acks(resumed),
            idle_timeout=to_duration(idle_seconds),
        )
    )
