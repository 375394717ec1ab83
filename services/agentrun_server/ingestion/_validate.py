"""Validation of wire-form runs: cheap checks on the protobuf message, no model building.

The rules are the SDK model's (`agentrun._limits`), so a run the SDK builds is a run the server
stores, and a stored run always reads back into the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from agentrun.v1 import agent_run_pb2 as pb
from agentrun_server._checks import check_name, value_depth_problem
from agentrun_server._errors import InvalidArgument


def validate_agent_run(run: pb.AgentRun) -> None:
    """Check what storing and rendering a run relies on.

    Raises:
        InvalidArgument: naming the field at fault (e.g. `transcripts[0].messages[3].role`).
    """
    check_name("id", run.id, nfc=False)
    if not run.transcripts:
        raise InvalidArgument("transcripts: an agent run must have at least one transcript")
    if "scores" in run.metadata.fields:
        raise InvalidArgument(
            "metadata.fields['scores']: scores travel in AgentRun.scores (bool, int or double), "
            "not as a metadata field"
        )
    _check_values("metadata", _metadata_values(run.metadata))
    keys = set()
    for t, transcript in enumerate(run.transcripts):
        check_name(f"transcripts[{t}].key", transcript.key, nfc=False)
        if transcript.key in keys:
            raise InvalidArgument(f"transcripts[{t}].key: duplicate key {transcript.key!r}")
        keys.add(transcript.key)
        _check_values(f"transcripts[{t}].metadata", _metadata_values(transcript.metadata))
        for m, message in enumerate(transcript.messages):
            role = message.WhichOneof("role")
            if role is None:
                raise InvalidArgument(f"transcripts[{t}].messages[{m}].role: required")
            if message.WhichOneof("content") is None:
                raise InvalidArgument(f"transcripts[{t}].messages[{m}].content: required")
            where = f"transcripts[{t}].messages[{m}]"
            if role == "assistant":
                for c, call in enumerate(message.assistant.tool_calls):
                    _check_struct(f"{where}.tool_calls[{c}].arguments", call.arguments, 1)
            elif role == "tool" and message.tool.HasField("error"):
                _check_struct(f"{where}.tool.error", message.tool.error, 1)


def _metadata_values(metadata: pb.Metadata) -> Iterator[tuple[str, pb.Value]]:
    for key, field in metadata.fields.items():
        yield f"fields[{key[:64]!r}]", field.value


def _check_values(where: str, values: Iterable[tuple[str, pb.Value]]) -> None:
    for name, value in values:
        problem = value_depth_problem(value)
        if problem:
            raise InvalidArgument(f"{where}.{name}: {problem}")


def _check_struct(where: str, struct: pb.StructValue, depth: int) -> None:
    for field in struct.fields:
        problem = value_depth_problem(field.value, depth)
        if problem:
            raise InvalidArgument(f"{where}: {problem}")


def field_of(error: InvalidArgument) -> str:
    """The field path an InvalidArgument message starts with."""
    return str(error).split(":", 1)[0]
