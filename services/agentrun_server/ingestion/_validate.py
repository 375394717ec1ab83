"""Validation of wire-form runs: cheap checks on the protobuf message, no model building.

The checks are the wire contract's (`agentrun.wire.checks`), which the SDK's writer applies too,
so a run the writer accepts is a run the server stores, and a stored run always reads back into
the model.
"""

from __future__ import annotations

from agentrun.v1 import agent_run_pb2 as pb
from agentrun.wire.checks import InvalidRun as WireInvalidRun
from agentrun.wire.checks import check_agent_run
from agentrun_server._errors import InvalidArgument


class InvalidRun(InvalidArgument):
    """A run that cannot be stored; `field` names the field at fault."""

    def __init__(self, problem: WireInvalidRun) -> None:
        super().__init__(f"{problem.field}: {problem.reason}")
        self.field = problem.field


def validate_agent_run(run: pb.AgentRun, *, shallow: bool = False) -> None:
    """Check what storing and rendering a run relies on (`shallow`: its nesting is known to be
    within the limit, from `agentrun.wire.checks.parse_agent_run`).

    Raises:
        InvalidRun: naming the field at fault (e.g. `transcripts[0].messages[3].role`).
    """
    try:
        check_agent_run(run, shallow=shallow)
    except WireInvalidRun as problem:
        raise InvalidRun(problem) from None
