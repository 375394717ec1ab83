"""Workflows and tasks between their wire form and storage records."""

from __future__ import annotations

from agentrun.v1 import workflow_pb2 as pb
from agentrun_server.serving import seconds_of, to_duration, to_timestamp
from agentrun_server.storage import StageDef, TaskRecord, TaskState, WorkflowDef
from agentrun_server.storage._types import (
    DEFAULT_INITIAL_BACKOFF_SECONDS,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BACKOFF_SECONDS,
)

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
            pb.AttemptFailure(attempt=f.attempt, error=f.error, time=to_timestamp(f.failed_at))
            for f in task.failures
        ],
    )
    if task.lease_deadline is not None and task.state is TaskState.LEASED:
        out.lease_deadline.CopyFrom(to_timestamp(task.lease_deadline))
    if task.output:
        out.output.MergeFromString(task.output)
    if task.input:
        out.input.MergeFromString(task.input)
    return out
