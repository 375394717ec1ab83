"""What the `Client`'s calls answer: the server's records as SDK models, never generated types.

Times are timezone-aware `datetime`s (UTC), None where the server set none; durations are
seconds; task states are `TaskState`; task inputs and outputs are JSON-like values
(`value_from_proto`). Each record is built from its wire form by `from_proto`.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict

from agentrun._convert import message_from_proto, score_from_proto, value_from_proto
from agentrun._workflow import StageSpec, WorkflowSpec
from agentrun.chat import ChatMessage
from agentrun.v1 import agent_run_pb2, workflow_pb2
from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import key_service_pb2 as key_pb


def _time(message: Message, field: str) -> datetime | None:
    """A Timestamp field as a UTC datetime; None when unset."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=UTC)


def _seconds(message: Message, field: str) -> float | None:
    """A Duration field in seconds; None when unset."""
    if not message.HasField(field):
        return None
    duration: duration_pb2.Duration = getattr(message, field)
    return duration.seconds + duration.nanos / 1e9


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class Collection(_Record):
    """A named set of runs, optionally bound to a workflow its runs enter."""

    id: str
    name: str
    description: str = ""
    workflow: str = ""
    """The workflow each stored run enters ("": none)."""
    create_time: datetime | None = None
    run_count: int = 0
    enter_workflow_on_abandon: bool = False
    """Live runs enter the workflow when abandoned too, not only when they finish."""
    retention_days: int = 0
    """Days a run is kept after it is stored (0: until deleted)."""
    running_count: int = 0
    """Its live runs running now (an event within the server's live run timeout)."""
    abandoned_count: int = 0
    """Its live runs abandoned (no event for the live run timeout)."""

    @classmethod
    def from_proto(cls, message: ingestion_pb.Collection) -> Collection:
        return cls(
            id=message.id,
            name=message.name,
            description=message.description,
            workflow=message.workflow,
            create_time=_time(message, "create_time"),
            run_count=message.run_count,
            enter_workflow_on_abandon=message.enter_workflow_on_abandon,
            retention_days=message.retention_days,
            running_count=message.running_count,
            abandoned_count=message.abandoned_count,
        )


class Deletion(_Record):
    """What `Client.delete_runs` or `Client.delete_collection` removed."""

    deleted_run_count: int = 0
    deleted_task_count: int = 0
    """Tasks of the runs, in every workflow."""
    revoked_lease_count: int = 0
    """Leases a forced deletion revoked (their tasks cancelled first)."""
    not_found_agent_run_ids: list[str] = []
    """Run ids named that named no run."""

    @classmethod
    def from_proto(
        cls, message: ingestion_pb.DeleteAgentRunsResponse | ingestion_pb.DeleteCollectionResponse
    ) -> Deletion:
        return cls(
            deleted_run_count=message.deleted_run_count,
            deleted_task_count=message.deleted_task_count,
            revoked_lease_count=message.revoked_lease_count,
            not_found_agent_run_ids=list(getattr(message, "not_found_agent_run_ids", [])),
        )


class CollectionCreated(Collection):
    """The collection `create_collection` made or found: a `Collection` (`.id`, `.name`, ... as
    `get_collection` returns), and whether this call created it (False: it existed, as it was
    made)."""

    created: bool = True

    @property
    def collection(self) -> Collection:
        """The collection alone (this record without `created`)."""
        return Collection(**self.model_dump(exclude={"created"}))


class Workflow(WorkflowSpec):
    """A workflow as stored: its definition (a `WorkflowSpec`, every stage's policy filled in)
    and its version, which grows each time a changed definition is applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 0
    update_time: datetime | None = None

    @classmethod
    def from_proto(cls, message: workflow_pb2.Workflow) -> Workflow:
        stages = [
            StageSpec(
                name=stage.name,
                pathways={p.name: p.next_stage or None for p in stage.pathways},
                max_attempts=stage.retry_policy.max_attempts or None,
                lease_seconds=_seconds(stage, "lease_duration"),
                initial_backoff_seconds=_seconds(stage.retry_policy, "initial_backoff"),
                max_backoff_seconds=_seconds(stage.retry_policy, "max_backoff"),
            )
            for stage in message.stages
        ]
        return cls(
            name=message.name,
            stages=stages,
            version=message.version,
            update_time=_time(message, "update_time"),
        )


class WorkflowApplied(_Record):
    """A workflow as stored after an apply, whether the apply changed it, and how many tasks of
    dropped stages a forced apply cancelled."""

    workflow: Workflow
    changed: bool
    cancelled_count: int = 0


class TaskState(enum.StrEnum):
    """A task's state: ready (now or scheduled), leased to a worker, done, dead (attempts spent
    or failed for good: a dead letter), or cancelled."""

    READY = "ready"
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"
    CANCELLED = "cancelled"

    def to_proto(self) -> workflow_pb2.TaskState.ValueType:
        return workflow_pb2.TaskState.Value(f"TASK_STATE_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> TaskState:
        return cls[workflow_pb2.TaskState.Name(value).removeprefix("TASK_STATE_")]  # type: ignore[arg-type]


class LeaseHolder(_Record):
    """Who held a lease: the Work stream that leased the task, or took it over on resume."""

    worker: str = ""
    """The worker's identity (the Runner's `worker` name, e.g. "grader@host-1/pid-42")."""
    key: str = ""
    """The name of the stream's API key ("" when the server checks none)."""
    session_id: str = ""
    """The Work session, as the server logs it."""

    @classmethod
    def from_proto(cls, message: workflow_pb2.LeaseHolder) -> LeaseHolder:
        return cls(worker=message.worker, key=message.key, session_id=message.session_id)

    def __str__(self) -> str:
        held = self.worker or f"session {self.session_id}"
        return f"{held} (key {self.key})" if self.key else held


def _holder(message: workflow_pb2.Task | workflow_pb2.AttemptFailure) -> LeaseHolder | None:
    return LeaseHolder.from_proto(message.holder) if message.HasField("holder") else None


class AttemptFailure(_Record):
    """A failed attempt of a task: the worker's error, or why its lease ended."""

    attempt: int
    error: str
    time: datetime | None = None
    holder: LeaseHolder | None = None
    """Who held the attempt's lease (None for attempts stored before holders were kept)."""


class Task(_Record):
    """A run's passage through one stage of a workflow."""

    id: str
    workflow: str
    stage: str
    agent_run_id: str
    collection_id: str
    state: TaskState
    attempt: int
    """Attempts made so far (the one under way included, while leased)."""
    max_attempts: int
    priority: int = 0
    create_time: datetime | None = None
    ready_time: datetime | None = None
    """When it is (or was) ready to lease: later than now for a scheduled retry."""
    lease_deadline: datetime | None = None
    pathway: str = ""
    """The pathway it was completed with (done tasks)."""
    input: Any = None
    """The previous stage's output (JSON-like; None at the first stage)."""
    output: Any = None
    """The output it was completed with (JSON-like)."""
    failures: tuple[AttemptFailure, ...] = ()
    previous_task_id: str = ""
    holder: LeaseHolder | None = None
    """Who holds the lease (leased), or held the attempt that completed the task (done)."""

    @classmethod
    def from_proto(cls, message: workflow_pb2.Task) -> Task:
        return cls(
            id=message.id,
            workflow=message.workflow,
            stage=message.stage,
            agent_run_id=message.agent_run_id,
            collection_id=message.collection_id,
            state=TaskState.from_proto(message.state),
            attempt=message.attempt,
            max_attempts=message.max_attempts,
            priority=message.priority,
            create_time=_time(message, "create_time"),
            ready_time=_time(message, "ready_time"),
            lease_deadline=_time(message, "lease_deadline"),
            pathway=message.pathway,
            input=value_from_proto(message.input) if message.HasField("input") else None,
            output=value_from_proto(message.output) if message.HasField("output") else None,
            failures=tuple(
                AttemptFailure(
                    attempt=f.attempt, error=f.error, time=_time(f, "time"), holder=_holder(f)
                )
                for f in message.failures
            ),
            previous_task_id=message.previous_task_id,
            holder=_holder(message),
        )


class StageBacklog(_Record):
    """Task counts of one stage, and the age of its oldest task ready now."""

    workflow: str
    stage: str
    ready_count: int = 0
    """Ready to lease now."""
    scheduled_count: int = 0
    """Ready at a later time (retries waiting out their backoff)."""
    leased_count: int = 0
    done_count: int = 0
    dead_count: int = 0
    cancelled_count: int = 0
    oldest_ready_age_seconds: float = 0.0

    @classmethod
    def from_proto(cls, message: workflow_pb2.StageBacklog) -> StageBacklog:
        return cls(
            workflow=message.workflow,
            stage=message.stage,
            ready_count=message.ready_count,
            scheduled_count=message.scheduled_count,
            leased_count=message.leased_count,
            done_count=message.done_count,
            dead_count=message.dead_count,
            cancelled_count=message.cancelled_count,
            oldest_ready_age_seconds=_seconds(message, "oldest_ready_age") or 0.0,
        )


class ListedRun(_Record):
    """A run as a listing shows it (`Client.list_runs`): no transcripts, no metadata."""

    id: str
    collection_id: str
    name: str | None = None
    state: str = "finished"
    """"running", "finished" or "abandoned"."""
    scores: dict[str, bool | int | float | None] = {}
    message_count: int = 0
    event_count: int = 0
    """Events of a live run (0 for a run uploaded whole)."""
    ingest_time: datetime | None = None
    update_time: datetime | None = None

    @classmethod
    def from_proto(cls, message: ingestion_pb.StoredAgentRun) -> ListedRun:
        run = message.agent_run
        state = ingestion_pb.AgentRunState.Name(message.state).removeprefix("AGENT_RUN_STATE_")
        return cls(
            id=run.id,
            collection_id=message.collection_id,
            name=run.name if run.HasField("name") else None,
            state=state.lower(),
            scores={name: score_from_proto(score) for name, score in run.scores.items()},
            message_count=message.message_count,
            event_count=message.event_count,
            ingest_time=_time(message, "ingest_time"),
            update_time=_time(message, "update_time"),
        )


class RunPage(_Record):
    """One page of `Client.list_runs`, and the token of the next ("" on the last)."""

    runs: list[ListedRun]
    next_page_token: str = ""


class RunEvent(_Record):
    """One event of a live run as it landed: the messages it appended to each transcript (by
    key), the scores it set, and whether it finished the run."""

    sequence: int
    messages: tuple[tuple[str, ChatMessage], ...] = ()
    """(transcript key, message), in order."""
    scores: dict[str, bool | int | float | None] = {}
    name: str = ""
    """The run's name, when this event set it."""
    finish: bool = False

    @classmethod
    def from_proto(cls, message: ingestion_pb.AgentRunEvent) -> RunEvent:
        patch: agent_run_pb2.AgentRun = message.patch
        return cls(
            sequence=message.sequence,
            messages=tuple(
                (transcript.key, message_from_proto(m))
                for transcript in patch.transcripts
                for m in transcript.messages
            ),
            scores={key: score_from_proto(score) for key, score in patch.scores.items()},
            name=patch.name,
            finish=message.finish,
        )


class RunUpdate(_Record):
    """Events that landed on a watched run, and the run's state after them ("running",
    "finished" or "abandoned")."""

    events: tuple[RunEvent, ...]
    state: str

    @classmethod
    def from_proto(cls, message: ingestion_pb.WatchAgentRunResponse) -> RunUpdate:
        state = ingestion_pb.AgentRunState.Name(message.state).removeprefix("AGENT_RUN_STATE_")
        return cls(
            events=tuple(RunEvent.from_proto(event) for event in message.events),
            state=state.lower(),
        )


class ApiKey(_Record):
    """An API key entry (never its token): what it may do, and when it was used."""

    name: str
    scopes: tuple[str, ...]
    collections: tuple[str, ...] = ()
    """The collections it is limited to (empty with `workflows` empty: not limited)."""
    workflows: tuple[str, ...] = ()
    certificate_subject: str = ""
    """The client certificate subject it admits (mTLS); "" for a token key."""
    create_time: datetime | None = None
    revoke_time: datetime | None = None
    last_use_time: datetime | None = None
    expire_time: datetime | None = None

    @classmethod
    def from_proto(cls, message: key_pb.ApiKey) -> ApiKey:
        return cls(
            name=message.name,
            scopes=tuple(message.scopes),
            collections=tuple(message.collections),
            workflows=tuple(message.workflows),
            certificate_subject=message.certificate_subject,
            create_time=_time(message, "create_time"),
            revoke_time=_time(message, "revoke_time"),
            last_use_time=_time(message, "last_use_time"),
            expire_time=_time(message, "expire_time"),
        )


class ApiKeyCreated(_Record):
    """A key just created, and its token: shown this once (the server keeps only its hash)."""

    key: ApiKey
    token: str
