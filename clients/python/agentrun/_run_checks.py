"""The checks a wire-form run must pass, shared by the SDK's writer and the ingestion server.

The writer runs them on each run it encodes, so a run it accepts is a run the server stores, and a
run the server would refuse fails in the caller of `log_agent_runs`, naming the field, instead of
coming back as a rejection (or never decoding) seconds later. Cheap: a walk over the message, no
model building.
"""

from __future__ import annotations

from collections.abc import Iterator

from agentrun._errors import InvalidRunError
from agentrun._limits import MAX_VALUE_DEPTH, name_problem, shown
from agentrun.v1 import agent_run_pb2 as pb


def check_agent_run(run: pb.AgentRun) -> None:
    """Check what storing and rendering a run relies on: a printable id, at least one transcript,
    distinct printable transcript keys, a role and content on every message, no metadata field
    `scores` (scores travel in `AgentRun.scores`), values nested at most MAX_VALUE_DEPTH deep.

    Raises:
        InvalidRunError: naming the first field at fault.
    """
    found = _first_problem(run)
    if found is not None:
        field, reason = found
        raise InvalidRunError(run.id if len(run.id) <= 256 else shown(run.id), field, reason)


def proto_value_depth_problem(value: pb.Value, depth: int = 0) -> str | None:
    """Why `value` nests too deep, or None: as `agentrun._limits.value_depth_problem` counts on
    the model (a struct or list is one level), with `depth` levels above it already."""
    stack = [(value, depth)]
    while stack:
        current, level = stack.pop()
        kind = current.WhichOneof("kind")
        if kind == "struct_value":
            children = [f.value for f in current.struct_value.fields]
        elif kind == "list_value":
            children = list(current.list_value.values)
        else:
            continue
        if level + 1 > MAX_VALUE_DEPTH:
            return f"nested more than {MAX_VALUE_DEPTH} levels deep (dicts and lists)"
        stack.extend((child, level + 1) for child in children)
    return None


def _first_problem(run: pb.AgentRun) -> tuple[str, str] | None:
    """(field, reason) of the first problem, or None."""
    problem = name_problem(run.id)
    if problem is not None:
        return "id", f"{shown(run.id)}: {problem}"
    if not run.transcripts:
        return "transcripts", "an agent run must have at least one transcript"
    if "scores" in run.metadata.fields:
        return (
            "metadata.fields['scores']",
            "scores travel in AgentRun.scores (bool, int or double), not as a metadata field",
        )
    found = _metadata_problem("metadata", run.metadata)
    if found is not None:
        return found
    keys = set()
    for t, transcript in enumerate(run.transcripts):
        problem = name_problem(transcript.key)
        if problem is not None:
            return f"transcripts[{t}].key", f"{shown(transcript.key)}: {problem}"
        if transcript.key in keys:
            return f"transcripts[{t}].key", f"duplicate key {shown(transcript.key)}"
        keys.add(transcript.key)
        found = _metadata_problem(f"transcripts[{t}].metadata", transcript.metadata)
        if found is not None:
            return found
        for m, message in enumerate(transcript.messages):
            where = f"transcripts[{t}].messages[{m}]"
            role = message.WhichOneof("role")
            if role is None:
                return f"{where}.role", "required"
            if message.WhichOneof("content") is None:
                return f"{where}.content", "required"
            if role == "assistant":
                for c, call in enumerate(message.assistant.tool_calls):
                    problem = _struct_problem(call.arguments)
                    if problem is not None:
                        return f"{where}.tool_calls[{c}].arguments", problem
            elif role == "tool" and message.tool.HasField("error"):
                problem = _struct_problem(message.tool.error)
                if problem is not None:
                    return f"{where}.tool.error", problem
    return None


def _metadata_problem(where: str, metadata: pb.Metadata) -> tuple[str, str] | None:
    for key, field in metadata.fields.items():
        problem = proto_value_depth_problem(field.value)
        if problem is not None:
            return f"{where}.fields[{key[:64]!r}]", problem
    return None


def _fields(struct: pb.StructValue) -> Iterator[pb.Value]:
    for field in struct.fields:
        yield field.value


def _struct_problem(struct: pb.StructValue) -> str | None:
    # The struct itself is the first level.
    for value in _fields(struct):
        problem = proto_value_depth_problem(value, 1)
        if problem is not None:
            return problem
    return None
