"""Workflow files: YAML or JSON of `{name, stages: [{name, pathways: {pathway: next_stage|null}}]}`.

The first stage is where runs enter; a null pathway (or a stage with no pathways) ends the
workflow. Optional per stage: `max_attempts`, `lease_seconds`, `initial_backoff_seconds`,
`max_backoff_seconds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

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


class StageSpec(BaseModel):
    """One stage of a workflow file, within the server's limits (`agentrun.wire.limits`)."""

    model_config = ConfigDict(extra="forbid")

    name: Identifier
    pathways: dict[Identifier, Identifier | None] = Field(
        default_factory=dict, max_length=MAX_PATHWAYS
    )
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS)
    lease_seconds: float | None = Field(default=None, gt=0, le=MAX_LEASE_SECONDS)
    initial_backoff_seconds: float | None = Field(default=None, ge=0, le=MAX_DELAY_SECONDS)
    max_backoff_seconds: float | None = Field(default=None, ge=0, le=MAX_DELAY_SECONDS)


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
            names the file and the field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FormatError(f"{path}: cannot read workflow: {exc}") from exc
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors()
        )
        raise FormatError(f"{path}: not a workflow: {problems}") from exc
