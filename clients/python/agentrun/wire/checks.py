"""The checks a wire-form run must pass, applied by the SDK's writer and the ingestion server alike.

The writer runs them on each run it encodes, so a run it accepts is a run the server stores, and a
run the server would refuse fails in the caller of `log_agent_runs`, naming the field, instead of
coming back as a rejection (or never decoding) seconds later. Cheap: no model building, and the
values' nesting is proved in the protobuf decoder's C code (`parse_agent_run`), walked only when
that cannot prove it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from agentrun.v1 import agent_run_pb2 as pb
from agentrun.wire.framing import encode_varint
from agentrun.wire.limits import MAX_VALUE_DEPTH, name_problem, shown


class InvalidRun(ValueError):
    """A wire-form run (or a live run's event) breaks a check: the server refuses it, and the
    SDK refuses to send it (`agentrun.InvalidRunError` is this error, and the SDK's).

    Attributes:
        agent_run_id: The run's id (cut short when over the name limit).
        field: The field at fault, e.g. "transcripts[0].messages[3].role" or
            "metadata.fields['config']".
        reason: Why, e.g. "nested more than 20 levels deep (dicts and lists)".
    """

    def __init__(self, agent_run_id: str, field: str, reason: str) -> None:
        super().__init__(f"agent run {agent_run_id!r}: {field}: {reason}")
        self.agent_run_id = agent_run_id
        self.field = field
        self.reason = reason


def check_agent_run(
    run: pb.AgentRun, *, shallow: bool = False, patch: bool = False, from_model: bool = False
) -> None:
    """Check what storing and rendering a run relies on: a printable id, at least one transcript,
    distinct printable transcript keys, a role and content on every message, no metadata field
    `scores` (scores travel in `AgentRun.scores`), values nested at most MAX_VALUE_DEPTH deep
    (not walked when `shallow`: `parse_agent_run` or `encodes_shallow` found so already).
    A `patch` (a live run's event) may hold no transcript. `from_model`: the run was converted
    from the SDK's pydantic model, whose messages have a role and content by construction, and
    shallow: its messages are not walked (a tau-bench run's 30 in 13 us, a fifteenth of its
    conversion; the server checks them again anyway).

    Raises:
        InvalidRun: naming the first field at fault.
    """
    found = _first_problem(run, shallow, patch, messages=not (from_model and shallow))
    if found is not None:
        field, reason = found
        raise InvalidRun(run.id if len(run.id) <= 256 else shown(run.id), field, reason)


def parse_agent_run(data: bytes | memoryview) -> tuple[pb.AgentRun, bool]:
    """Decode an encoded run, and say whether its values are known to nest at most
    MAX_VALUE_DEPTH deep (then `check_agent_run(run, shallow=True)` skips the walk).

    The run is decoded inside `_PROBE_LEVELS` nested groups of `_Probe`, which the protobuf
    decoder (C) counts against its nesting limit: when it decodes, nothing in the run nests
    deeper than a run whose metadata is a chain of MAX_VALUE_DEPTH lists, the cheapest nesting
    there is. Otherwise (a deeper run, or no such limit here) it is decoded plainly.

    Raises:
        DecodeError: not an encoded AgentRun.
    """
    if _PROBE_LEVELS:
        try:
            probe = _Probe.FromString(_probe_bytes(data, _PROBE_LEVELS))
        except DecodeError:
            pass
        else:
            for _ in range(_PROBE_LEVELS):
                probe = probe.probe
            return probe.run, True
    return pb.AgentRun.FromString(data), False  # type: ignore[arg-type]  # upb takes any buffer


def encodes_shallow(data: bytes) -> bool:
    """Whether an encoded run's values are known to nest at most MAX_VALUE_DEPTH deep (see
    `parse_agent_run`)."""
    if not _PROBE_LEVELS:
        return False
    try:
        _Probe.FromString(_probe_bytes(data, _PROBE_LEVELS))
    except DecodeError:
        return False
    return True


def proto_value_depth_problem(value: pb.Value, depth: int = 0) -> str | None:
    """Why `value` nests too deep, or None: as `agentrun.wire.limits.value_depth_problem` counts on
    the model (a struct or list is one level), with `depth` levels above it already."""
    kind = value.WhichOneof("kind")
    if kind != "struct_value" and kind != "list_value":
        return None
    # Each level costs at least 4 encoded bytes (a container, and the entry holding the next
    # level, each a tag and a length), the innermost 2: a value smaller cannot nest too deep.
    if value.ByteSize() < 4 * (MAX_VALUE_DEPTH - depth) + 2:
        return None
    if _nests_past(value, depth):
        return f"nested more than {MAX_VALUE_DEPTH} levels deep (dicts and lists)"
    return None


def _probe_class() -> Any:
    """`message Probe { optional group Probe = 1; optional agentrun.v1.AgentRun run = 2; }`
    (proto2): a group is delimited by tags, not a length, so wrapping costs no encoding."""
    file = descriptor_pb2.FileDescriptorProto(
        name="agentrun/_run_checks_probe.proto",
        package="agentrun.internal",
        syntax="proto2",
        dependency=[pb.DESCRIPTOR.name],
    )
    message = file.message_type.add(name="Probe")
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    message.field.add(
        name="probe",
        number=1,
        label=optional,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_GROUP,
        type_name=".agentrun.internal.Probe",
    )
    message.field.add(
        name="run",
        number=2,
        label=optional,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=".agentrun.v1.AgentRun",
    )
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName("agentrun.internal.Probe")
    except KeyError:
        pool.Add(file)
        descriptor = pool.FindMessageTypeByName("agentrun.internal.Probe")
    return message_factory.GetMessageClass(descriptor)


_Probe = _probe_class()


def _probe_bytes(data: bytes | memoryview, levels: int) -> bytes:
    return b"".join((b"\x0b" * levels, b"\x12", encode_varint(len(data)), data, b"\x0c" * levels))


def _most_levels(run: pb.AgentRun) -> int:
    """The most groups `run` decodes inside (0 if none; 1,000 stands for no limit found)."""
    data = run.SerializeToString()
    low, high = -1, 1000
    while low + 1 < high:  # low decodes (or is -1), high does not (or is the cap)
        middle = (low + high) // 2
        try:
            _Probe.FromString(_probe_bytes(data, middle))
            low = middle
        except DecodeError:
            high = middle
    return low


def _calibrate() -> int:
    """The groups to wrap a run in: a run whose metadata holds a chain of MAX_VALUE_DEPTH lists
    decodes inside them, one with a chain a level longer does not. 0 disables the probe."""

    def chained(levels: int) -> pb.AgentRun:
        run = pb.AgentRun(id="probe")
        value = run.metadata.fields["chain"].value
        for _ in range(levels):
            value = value.list_value.values.add()
        value.string_value = "x"
        return run

    levels = _most_levels(chained(MAX_VALUE_DEPTH))
    if levels <= 0 or levels >= 999 or _most_levels(chained(MAX_VALUE_DEPTH + 1)) >= levels:
        return 0
    return levels


_PROBE_LEVELS = _calibrate()


def _nests_past(value: pb.Value, level: int) -> bool:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        children: Any = [field.value for field in value.struct_value.fields]
    elif kind == "list_value":
        children = value.list_value.values
    else:
        return False
    if level >= MAX_VALUE_DEPTH:
        return True
    return any(_nests_past(child, level + 1) for child in children)


def _first_problem(
    run: pb.AgentRun, shallow: bool, patch: bool = False, messages: bool = True
) -> tuple[str, str] | None:
    """(field, reason) of the first problem, or None."""
    problem = name_problem(run.id)
    if problem is not None:
        return "id", f"{shown(run.id)}: {problem}"
    if not run.transcripts and not patch:
        return "transcripts", "an agent run must have at least one transcript"
    if "scores" in run.metadata.fields:
        return (
            "metadata.fields['scores']",
            "scores travel in AgentRun.scores (bool, int or double), not as a metadata field",
        )
    if not shallow and (found := _metadata_problem("metadata", run.metadata)):
        return found
    keys = set()
    for t, transcript in enumerate(run.transcripts):
        problem = name_problem(transcript.key)
        if problem is not None:
            return f"transcripts[{t}].key", f"{shown(transcript.key)}: {problem}"
        if transcript.key in keys:
            return f"transcripts[{t}].key", f"duplicate key {shown(transcript.key)}"
        keys.add(transcript.key)
        where = f"transcripts[{t}].metadata"
        if not shallow and (found := _metadata_problem(where, transcript.metadata)):
            return found
        if not messages:
            continue
        if shallow:
            # What a shallow run's sound message needs, inline (a call per message cost a
            # sixth of this walk, which every run received takes); any doubt: the walk below.
            which = pb.ChatMessage.WhichOneof
            for message in transcript.messages:
                if not which(message, "role") or not which(message, "content"):
                    break
                if message.HasField("timestamp"):
                    break
            else:
                continue
        for m, message in enumerate(transcript.messages):
            if found := _message_problem(message, shallow):
                return f"transcripts[{t}].messages[{m}]{found[0]}", found[1]
    return None


def _message_problem(message: pb.ChatMessage, shallow: bool) -> tuple[str, str] | None:
    """(field below the message, reason) of its first problem, or None. Runs for every message
    of every run received: no work for a sound message beyond the checks themselves."""
    role = message.WhichOneof("role")
    if role is None:
        return ".role", "required"
    if message.WhichOneof("content") is None:
        return ".content", "required"
    if message.HasField("timestamp") and (problem := _timestamp_problem(message.timestamp)):
        return ".timestamp", problem
    if shallow:
        return None
    if role == "assistant":
        for c, call in enumerate(message.assistant.tool_calls):
            problem = _struct_problem(call.arguments)
            if problem is not None:
                return f".tool_calls[{c}].arguments", problem
    elif role == "tool" and message.tool.HasField("error"):
        problem = _struct_problem(message.tool.error)
        if problem is not None:
            return ".tool.error", problem
    return None


_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


def _timestamp_problem(timestamp: Any) -> str | None:
    if not _MIN_SECONDS <= timestamp.seconds <= _MAX_SECONDS:
        return "seconds must lie in 0001-01-01..9999-12-31"
    if not 0 <= timestamp.nanos <= 999_999_999:
        return "nanos must lie in 0..999,999,999"
    return None


def _metadata_problem(where: str, metadata: pb.Metadata) -> tuple[str, str] | None:
    for key, field in metadata.fields.items():
        problem = proto_value_depth_problem(field.value)
        if problem is not None:
            return f"{where}.fields[{key[:64]!r}]", problem
    return None


def _struct_problem(struct: pb.StructValue) -> str | None:
    for field in struct.fields:  # the struct itself is the first level
        problem = proto_value_depth_problem(field.value, 1)
        if problem is not None:
            return problem
    return None
