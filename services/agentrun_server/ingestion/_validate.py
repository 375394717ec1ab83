"""Validation of wire-form runs: cheap checks on the protobuf message, no model building."""

from __future__ import annotations

from agentrun.v1 import agent_run_pb2 as pb
from agentrun_server._errors import InvalidArgument
from agentrun_server.storage import check_name


def validate_agent_run(run: pb.AgentRun) -> None:
    """Check what storing and rendering a run relies on.

    Raises:
        InvalidArgument: naming the field at fault (e.g. `transcripts[0].messages[3].role`).
    """
    check_name("id", run.id)
    if not run.transcripts:
        raise InvalidArgument("transcripts: an agent run must have at least one transcript")
    keys = set()
    for t, transcript in enumerate(run.transcripts):
        check_name(f"transcripts[{t}].key", transcript.key)
        if transcript.key in keys:
            raise InvalidArgument(f"transcripts[{t}].key: duplicate key {transcript.key!r}")
        keys.add(transcript.key)
        for m, message in enumerate(transcript.messages):
            if message.WhichOneof("role") is None:
                raise InvalidArgument(f"transcripts[{t}].messages[{m}].role: required")
            if message.WhichOneof("content") is None:
                raise InvalidArgument(f"transcripts[{t}].messages[{m}].content: required")


def field_of(error: InvalidArgument) -> str:
    """The field path an InvalidArgument message starts with."""
    return str(error).split(":", 1)[0]
