"""Stage functions: what they ask for, and what they may return.

A stage function asks for what it needs by annotating its parameters, as Encord's Runner injects
what an agent needs by type:

    def triage(run: AgentRun) -> str: ...                              # the run
    def grade(run: AgentRun, task: TaskContext) -> StageResult: ...    # and its task
    def summarize(task: TaskContext) -> str: ...                       # the task alone
    def review(previous: TaskInput) -> None: ...                       # the last stage's output

A lone parameter gets the run unless annotated otherwise, so `def stage(run)` works as it always
did. The run
is built only for a function that asks for it (about a millisecond of CPU for a real run).

It returns a pathway name (None: the end, at a terminal stage), or one of:

    StageResult(pathway, output)    complete, storing an output (the next stage's task input)
    Retry(after=seconds)            run it again later: not an error, no attempt spent
    Fail(reason, retryable=False)   fail the attempt without raising (retried if `retryable`)
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeAlias

from agentrun._agent_run import AgentRun
from agentrun._convert import agent_run_from_proto, value_from_proto
from agentrun._errors import WorkflowError
from agentrun.wire.limits import MAX_DELAY_SECONDS
from agentrun.work import Lease

_INPUT = "agentrun.TaskInput"
TaskInput: TypeAlias = Annotated[Any, _INPUT]
"""Annotate a stage function's parameter with this to receive the task's input: the JSON-like
output the previous stage stored (`StageResult.output`), or None."""


@dataclass(frozen=True)
class TaskContext:
    """The task a stage function works on (annotate a parameter with `TaskContext` to get it).

    Attributes:
        task_id: The task.
        workflow: Its workflow.
        stage: Its stage.
        attempt: This attempt, from 1 (a retry after a failure counts up; a `Retry` does not).
        max_attempts: The stage's attempts in all.
        lease_deadline: When the lease ends unless extended (UTC); the Runner extends it while the
            function runs, so this is for information.
        input: The previous stage's output (`StageResult.output`), or None.
        agent_run_id: The run's id.
        collection_id: The run's collection.
        priority: The task's priority (higher first).
        create_time: When the task was created (UTC): ready from then, unless a retry's backoff
            held it; the time from it to the call is the task's wait in the queue.
    """

    task_id: str
    workflow: str
    stage: str
    attempt: int
    max_attempts: int
    lease_deadline: datetime
    input: Any
    agent_run_id: str
    collection_id: str
    priority: int
    create_time: datetime | None = None


@dataclass(frozen=True)
class StageResult:
    """What a stage function may return instead of a pathway name.

    Attributes:
        pathway: The pathway (None: as for a function returning None).
        output: A JSON-like value stored with the task (`Client.get_task`) and passed to the next
            stage as its task's input; at most 1 MiB encoded.
    """

    pathway: str | None = None
    output: Any = None


@dataclass(frozen=True)
class Retry:
    """Return this to run the task again later, without it counting as an error: the lease is
    handed back, the task is ready again after `after` seconds, and no attempt is spent (a rate
    limit, an external state not yet reached). Retrying forever is the function's to avoid."""

    after: float = 0.0
    """Seconds before the task is ready again: 0 to 7 days (`agentrun.wire.limits.MAX_DELAY_SECONDS`,
    the server's limit).

    Raises:
        ValueError: `after` is negative, not finite, or over 7 days.
    """

    def __post_init__(self) -> None:
        if not 0 <= self.after <= MAX_DELAY_SECONDS:  # also refuses NaN
            raise ValueError(
                f"Retry(after={self.after!r}): seconds from 0 to {MAX_DELAY_SECONDS:,.0f} (7 days)"
            )


@dataclass(frozen=True)
class Fail:
    """Return this to fail the attempt without raising. Not `retryable` (the default), the task is
    dead at once, with `reason` in its history; `retryable`, it is retried with backoff while
    attempts remain, as after an exception."""

    reason: str
    retryable: bool = False


StageReturn: TypeAlias = "str | StageResult | Retry | Fail | None"
StageFunction: TypeAlias = Callable[..., "StageReturn | Awaitable[StageReturn]"]


def _kind(name: str, hint: Any) -> str | None:
    """What a parameter annotated `hint` asks for: "run", "task", "input", or None."""
    if typing.get_origin(hint) is Annotated and _INPUT in typing.get_args(hint)[1:]:
        return "input"
    if hint is TaskContext:
        return "task"
    if isinstance(hint, type) and issubclass(hint, AgentRun):
        return "run"
    if isinstance(hint, str):  # an annotation that could not be resolved: read its name
        last = hint.replace(" ", "").split(".")[-1]
        return {"AgentRun": "run", "TaskContext": "task", "TaskInput": "input"}.get(last)
    return None


def parameters(function: StageFunction, stage: str) -> list[str]:
    """What each parameter of a stage function asks for, in order ("run", "task" or "input").

    Raises:
        WorkflowError: a parameter asks for nothing a stage function can be given.
    """
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # forward references the function's module cannot resolve: read names
        hints = {
            name: p.annotation
            for name, p in signature.parameters.items()
            if p.annotation is not inspect.Parameter.empty
        }
    kinds = []
    params = [
        p
        for p in signature.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty
    ]
    for param in params:
        hint = hints.get(param.name, inspect.Parameter.empty)
        kind = _kind(param.name, hint) if hint is not inspect.Parameter.empty else None
        if kind is None and len(params) == 1:
            kind = "run"  # `def stage(run)`, or `run: Any`: the run, as always
        if kind is None:
            raise WorkflowError(
                f"stage {stage!r}: parameter {param.name!r} of {function.__name__} asks for "
                "nothing the Runner gives: annotate it with AgentRun, TaskContext or TaskInput"
            )
        kinds.append(kind)
    return kinds


def _deadline(lease: Lease) -> datetime:
    return datetime.fromtimestamp(lease.deadline, tz=UTC)


def arguments(kinds: list[str], lease: Lease, workflow: str) -> list[Any]:
    """The arguments of a stage function for one lease: the run only if it asks for it.

    Raises:
        pydantic.ValidationError, ValueError: the run does not convert to the model.
    """
    task_input = value_from_proto(lease.input) if lease.input is not None else None
    values: dict[str, Any] = {"input": task_input}
    if "run" in kinds:
        values["run"] = agent_run_from_proto(lease.agent_run)
    if "task" in kinds:
        values["task"] = TaskContext(
            task_id=lease.task_id,
            workflow=workflow,
            stage=lease.stage,
            attempt=lease.attempt,
            max_attempts=lease.max_attempts,
            lease_deadline=_deadline(lease),
            input=task_input,
            agent_run_id=lease.agent_run.id,
            collection_id=lease.collection_id,
            priority=lease.priority,
            create_time=datetime.fromtimestamp(lease.created_at, tz=UTC),
        )
    return [values[kind] for kind in kinds]
