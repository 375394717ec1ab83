"""Workflow files: YAML or JSON of `{name, stages: [{name, pathways: {pathway: next_stage|null}}]}`.

The first stage is where runs enter; a null pathway (or a stage with no pathways) ends the
workflow. Optional per stage: `max_attempts`, `lease_seconds`, `initial_backoff_seconds`,
`max_backoff_seconds`; durations are seconds (`90`, `0.5`) or a duration text as Kubernetes and
Prometheus write them (`250ms`, `30s`, `5m`, `1h30m`, `2d`).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from agentrun._errors import FormatError
from agentrun.v1 import workflow_pb2 as pb
from agentrun.wire.limits import (
    IDENTIFIER_PATTERN,
    MAX_ATTEMPTS,
    MAX_DELAY_SECONDS,
    MAX_LEASE_SECONDS,
    MAX_PATHWAYS,
    MAX_STAGES,
)

Identifier = Annotated[str, StringConstraints(pattern=f"^{IDENTIFIER_PATTERN.pattern}$")]
"""A workflow, stage or pathway name, as the server takes it (`agentrun.wire.limits`)."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: Any) -> Any:
    """Seconds from a duration text (`250ms`, `30s`, `5m`, `1h30m`, `2d`); numbers and anything
    else pass through for the field's own check.

    Raises:
        ValueError: a text that is neither a number nor a duration; the message shows the forms.
    """
    if not isinstance(value, str):
        return value
    text = value.strip().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(
            f"{value!r} is not a duration: write seconds (90) or 250ms, 30s, 5m, 1h30m, 2d"
        )
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


Seconds = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, given as a number or a duration text (`parse_duration`)."""


class StageSpec(BaseModel):
    """One stage of a workflow file, within the server's limits (`agentrun.wire.limits`)."""

    model_config = ConfigDict(extra="forbid")

    name: Identifier
    pathways: dict[Identifier, Identifier | None] = Field(
        default_factory=dict, max_length=MAX_PATHWAYS
    )
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS)
    lease_seconds: Seconds | None = Field(default=None, gt=0, le=MAX_LEASE_SECONDS)
    initial_backoff_seconds: Seconds | None = Field(default=None, ge=0, le=MAX_DELAY_SECONDS)
    max_backoff_seconds: Seconds | None = Field(default=None, ge=0, le=MAX_DELAY_SECONDS)


class WorkflowSpec(BaseModel):
    """A workflow file, within the server's limits: names `[A-Za-z0-9._-]{1,128}`, at most 200
    stages of at most 64 pathways, at most 100 attempts, durations up to 7 days."""

    model_config = ConfigDict(extra="forbid")

    name: Identifier
    stages: list[StageSpec] = Field(min_length=1, max_length=MAX_STAGES)

    def to_proto(self) -> pb.Workflow:
        """The wire form (the server validates that pathways lead to existing stages)."""
        workflow = pb.Workflow(name=self.name)
        for spec in self.stages:
            stage = workflow.stages.add(name=spec.name)
            for pathway, target in spec.pathways.items():
                stage.pathways.add(name=pathway, next_stage=target or "")
            if spec.max_attempts is not None:
                stage.retry_policy.max_attempts = spec.max_attempts
            if spec.initial_backoff_seconds is not None:
                stage.retry_policy.initial_backoff.FromNanoseconds(
                    int(spec.initial_backoff_seconds * 1e9)
                )
            if spec.max_backoff_seconds is not None:
                stage.retry_policy.max_backoff.FromNanoseconds(int(spec.max_backoff_seconds * 1e9))
            if spec.lease_seconds is not None:
                stage.lease_duration.FromNanoseconds(int(spec.lease_seconds * 1e9))
        return workflow


def load_workflow(path: str | Path) -> WorkflowSpec:
    """Read a workflow file (YAML or JSON; JSON is YAML).

    Raises:
        FormatError: the file cannot be read or does not have the workflow shape; the message
            names the file, the line and column of a syntax error, and the field of a wrong
            value (with the field meant, for a near miss such as `pathway`).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context = exc.context
        if context and exc.context_mark is not None:
            context += f" (from line {exc.context_mark.line + 1})"
        cause = ", ".join(part for part in (context, exc.problem) if part)
        raise FormatError(f"{where}: not valid YAML: {cause}") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FormatError(f"{path}: cannot read workflow: {exc}") from exc
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise FormatError(f"{path}: not a workflow: {problems}") from exc


def _problem(error: Any) -> str:
    """One validation error as `stages[0].pathway: ...`, an unknown field with the one meant."""
    where = ""
    for part in error["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        model = StageSpec if "stages" in error["loc"][:-1] else WorkflowSpec
        known = list(model.model_fields)
        near = difflib.get_close_matches(str(error["loc"][-1]), known, n=1, cutoff=0.6)
        message = "unknown field" + (
            f"; did you mean {near[0]!r}?" if near else f"; fields: {', '.join(known)}"
        )
    elif error["type"] == "value_error":
        message = str(error["ctx"]["error"]) if "ctx" in error else message
    return f"{where or '(file)'}: {message}"
