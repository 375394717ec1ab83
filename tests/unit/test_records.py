"""The Client's records (`agentrun._records`): each read from its wire form, with times as UTC
datetimes, durations as seconds, states as `TaskState` and values as JSON-like Python."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agentrun import (
    ApiKey,
    Collection,
    RunUpdate,
    StageBacklog,
    Task,
    TaskState,
    Workflow,
    WorkflowSpec,
    value_to_proto,
)
from agentrun.chat import AssistantMessage, UserMessage
from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import key_service_pb2 as key_pb
from agentrun.v1 import workflow_pb2

WHEN = datetime(2026, 12, 7, 1, 2, 3, 500_000, tzinfo=UTC)


def test_every_task_state_goes_both_ways_and_unset_times_and_values_are_none() -> None:
    for state in TaskState:
        assert TaskState.from_proto(state.to_proto()) is state
    message = workflow_pb2.Task(id="7", workflow="w", stage="a", state=workflow_pb2.TASK_STATE_DEAD)
    message.create_time.FromDatetime(WHEN)
    value_to_proto({"score": 5, "notes": ["a", None]}, message.output)
    failure = message.failures.add(attempt=1, error="boom")
    failure.time.FromDatetime(WHEN)
    task = Task.from_proto(message)
    assert task.state is TaskState.DEAD and task.state == "dead"
    assert task.create_time == WHEN and task.ready_time is None and task.lease_deadline is None
    assert task.output == {"score": 5, "notes": ["a", None]} and task.input is None
    assert [(f.attempt, f.error, f.time) for f in task.failures] == [(1, "boom", WHEN)]
    with pytest.raises(ValueError, match="frozen"):
        task.stage = "b"  # type: ignore[misc]


def test_a_workflow_reads_back_as_the_spec_it_was_applied_from() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "name": "grading",
            "stages": [
                {
                    "name": "triage",
                    "pathways": {"solved": "review", "failed": None},
                    "max_attempts": 3,
                    "lease_seconds": 90,
                    "initial_backoff_seconds": 0,
                    "max_backoff_seconds": 30.5,
                },
                {"name": "review"},
            ],
        }
    )
    message = spec.to_proto()
    message.version = 4
    message.update_time.FromDatetime(WHEN)
    stored = Workflow.from_proto(message)
    assert (stored.version, stored.update_time) == (4, WHEN)
    assert stored.model_dump(exclude={"version", "update_time"}) == spec.model_dump()
    assert stored.to_proto().stages == spec.to_proto().stages


def test_collections_backlogs_and_keys_read_their_times_and_durations() -> None:
    collection = ingestion_pb.Collection(id="c1", name="airline", run_count=3)
    collection.create_time.FromDatetime(WHEN)
    assert Collection.from_proto(collection) == Collection(
        id="c1", name="airline", create_time=WHEN, run_count=3
    )
    backlog = workflow_pb2.StageBacklog(workflow="w", stage="a", ready_count=2, dead_count=1)
    backlog.oldest_ready_age.FromMilliseconds(1500)
    read = StageBacklog.from_proto(backlog)
    assert (read.ready_count, read.dead_count, read.oldest_ready_age_seconds) == (2, 1, 1.5)
    key = key_pb.ApiKey(name="ci", scopes=["ingest"], collections=["airline"])
    key.expire_time.FromDatetime(WHEN)
    read_key = ApiKey.from_proto(key)
    assert (read_key.scopes, read_key.collections, read_key.expire_time) == (
        ("ingest",),
        ("airline",),
        WHEN,
    )
    assert read_key.create_time is None and read_key.revoke_time is None


def test_a_watched_runs_events_read_as_chat_messages_by_transcript() -> None:
    response = ingestion_pb.WatchAgentRunResponse(state=ingestion_pb.AGENT_RUN_STATE_FINISHED)
    event = response.events.add(agent_run_id="r", sequence=3, finish=True)
    transcript = event.patch.transcripts.add(key="main")
    transcript.messages.add(user=run_pb.UserRole(), text="hi")
    transcript.messages.add(assistant=run_pb.AssistantRole(), text="hello")
    event.patch.scores["passed"].bool_value = True
    update = RunUpdate.from_proto(response)
    assert update.state == "finished"
    (read,) = update.events
    assert (read.sequence, read.finish, read.scores) == (3, True, {"passed": True})
    assert [(key, type(m), m.text) for key, m in read.messages] == [
        ("main", UserMessage, "hi"),
        ("main", AssistantMessage, "hello"),
    ]
