"""Stage functions ask for what they need by annotation; the run is built only when asked for."""

from __future__ import annotations

from typing import Any

import pytest

from agentrun import (
    AgentRun,
    Retry,
    Runner,
    TaskContext,
    TaskInput,
    WorkflowError,
    _stage,
    agent_run_to_proto,
    value_to_proto,
)
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.work import Lease

from .test_models import docs_example as simple_run


def lease(with_input: bool = True) -> Lease:
    message = pb.Lease(task_id="7", lease_id="l", attempt=2, max_attempts=4, stage="s", priority=3)
    message.deadline.FromSeconds(1_800_000_000)
    message.agent_run.CopyFrom(agent_run_to_proto(simple_run()))
    message.collection_id = "c"
    if with_input:
        value_to_proto({"score": 5}, message.input)
    return Lease.of(message)


def test_parameters_are_read_off_their_annotations() -> None:
    def run_only(run):  # type: ignore[no-untyped-def]  # the seed's form: unannotated
        return None

    def everything(task: TaskContext, previous: TaskInput, run: AgentRun) -> None:
        return None

    def with_defaults(run: AgentRun, retries: int = 3, *rest: Any, **options: Any) -> None:
        return None

    assert _stage.parameters(run_only, "s") == ["run"]
    assert _stage.parameters(everything, "s") == ["task", "input", "run"]
    assert _stage.parameters(with_defaults, "s") == ["run"]


def test_a_parameter_asking_for_nothing_known_is_refused_at_registration() -> None:
    def two(run, other):  # type: ignore[no-untyped-def]
        return None

    def wrong(run: AgentRun, count: int) -> None:
        return None

    for function in (two, wrong):
        with pytest.raises(
            WorkflowError, match="annotate it with AgentRun, TaskContext or TaskInput"
        ):
            _stage.parameters(function, "s")


def test_the_run_is_built_only_for_a_function_that_asks_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: Any) -> Any:
        raise AssertionError("the run was built")

    monkeypatch.setattr(_stage, "agent_run_from_proto", refuse)
    leased = lease()
    task, given = _stage.arguments(["task", "input"], leased, "w")
    assert given == {"score": 5} and task.input == {"score": 5}
    assert (task.task_id, task.workflow, task.stage, task.attempt, task.max_attempts) == (
        "7",
        "w",
        "s",
        2,
        4,
    )
    assert task.lease_deadline.timestamp() == 1_800_000_000
    assert (task.agent_run_id, task.collection_id, task.priority) == (leased.agent_run.id, "c", 3)
    assert _stage.arguments(["input"], lease(with_input=False), "w") == [None]


@pytest.mark.parametrize("after", [-1.0, float("nan"), float("inf"), 7 * 24 * 3600 + 1])
def test_a_retry_outside_what_the_server_takes_is_refused_where_it_is_made(after: float) -> None:
    with pytest.raises(ValueError, match="seconds from 0 to 604,800"):
        Retry(after=after)
    assert Retry(after=7 * 24 * 3600).after == 604_800


@pytest.mark.parametrize(
    "options",
    [{"task_batch_size": 0}, {"concurrency": 0}, {"task_batch_size": 4, "concurrency": -1}],
)
def test_a_runner_refuses_sizes_below_one_before_it_connects(options: dict[str, int]) -> None:
    runner = Runner(workflow="w", server_url="127.0.0.1:1")  # nothing listens: never reached

    @runner.stage("s")
    def s(task: TaskContext) -> None:
        return None

    with pytest.raises(WorkflowError, match="must be >= 1"):
        runner(**options)
