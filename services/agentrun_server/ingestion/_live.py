"""Live runs: checking events, and folding a run's patches into the run as it stands."""

from __future__ import annotations

from collections.abc import Sequence

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.wire.checks import InvalidRun, check_agent_run
from agentrun_server._checks import check_reference
from agentrun_server._errors import InvalidArgument
from agentrun_server.ingestion._facets import facets_of_run
from agentrun_server.storage import Folded, NewEvent, event_digest


def _merge_metadata(
    owner: run_pb.AgentRun | run_pb.Transcript, patch: run_pb.AgentRun | run_pb.Transcript
) -> None:
    if not patch.HasField("metadata"):
        return
    into = owner.metadata
    into.SetInParent()  # present even when empty, as in a run uploaded whole
    for key, value in patch.metadata.fields.items():
        into.fields[key].CopyFrom(value)
    if patch.metadata.require_field_descriptions:
        into.require_field_descriptions = True


def apply_patch(run: run_pb.AgentRun, patch: run_pb.AgentRun) -> None:
    """Apply one event's patch to `run`, as `AgentRunEvent.patch` documents: messages appended per
    transcript key, scores and metadata fields merged by key, name and description replaced."""
    if patch.HasField("name"):
        run.name = patch.name
    if patch.HasField("description"):
        run.description = patch.description
    for key, score in patch.scores.items():
        run.scores[key].CopyFrom(score)
    _merge_metadata(run, patch)
    transcripts = {t.key: t for t in run.transcripts}
    for part in patch.transcripts:
        mine = transcripts.get(part.key)
        if mine is None:
            transcripts[part.key] = mine = run.transcripts.add(key=part.key)
        if part.id:
            mine.id = part.id
        if part.HasField("name"):
            mine.name = part.name
        if part.HasField("description"):
            mine.description = part.description
        _merge_metadata(mine, part)
        mine.messages.extend(part.messages)


def fold_run(run_id: str, parts: Sequence[bytes]) -> run_pb.AgentRun:
    """The run that a live run's patches, in order, make."""
    run = run_pb.AgentRun(id=run_id)
    for part in parts:
        apply_patch(run, run_pb.AgentRun.FromString(part))
    return run


def fold_finished(run_id: str, parts: Sequence[bytes]) -> Folded:
    """The storage `Fold`: a finished run encoded whole, its name and its facets.

    Raises:
        InvalidArgument: the run would be stored without a transcript.
    """
    run = fold_run(run_id, parts)
    if not run.transcripts:
        raise InvalidArgument(
            f"finish: run {run_id!r} has no transcript; append messages before finishing it"
        )
    name = run.name if run.HasField("name") else None
    return Folded(run.SerializeToString(), name, facets_of_run(run))


def checked_event(event: pb.AgentRunEvent, i: int) -> NewEvent:
    """The event to store.

    Raises:
        InvalidArgument: naming the field at fault, e.g. `events[3].patch.transcripts[0].key`.
    """
    where = f"events[{i}]"
    run_id = check_reference(f"{where}.agent_run_id", event.agent_run_id, required=True)
    if event.sequence < 1:
        raise InvalidArgument(f"{where}.sequence: must be at least 1 (a run's first event is 1)")
    collection_id = check_reference(f"{where}.collection_id", event.collection_id)
    patch = event.patch
    patch.id = run_id
    try:
        check_agent_run(patch, patch=True)
    except InvalidRun as problem:
        raise InvalidArgument(f"{where}.patch.{problem.field}: {problem.reason}") from None
    patch.id = ""
    # Deterministic: a resend of the event (and its digest) encodes to the same bytes.
    data = patch.SerializeToString(deterministic=True)
    return NewEvent(
        run_id,
        event.sequence,
        collection_id,
        data,
        event.finish,
        event_digest(data, event.finish),
    )
