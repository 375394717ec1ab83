"""The hand-framed messages of the wire contract (`agentrun.wire.framing`), held to the generated
classes: what the writer frames is what `SerializeToString` makes, and what the server splits is
what `FromString` reads."""

from __future__ import annotations

import grpc
from hypothesis import given
from hypothesis import strategies as st

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2 as work_pb
from agentrun.wire.codes import Code, code_name
from agentrun.wire.framing import (
    decode_upload_request,
    encode_events_request,
    encode_lease_batch,
    encode_upload_request,
    encode_varint,
    read_varint,
)

names = st.text(min_size=0, max_size=40)


def _run(run_id: str, text: str) -> run_pb.AgentRun:
    run = run_pb.AgentRun(id=run_id, name=text)
    message = run.transcripts.add(key="main").messages.add(text=text)
    message.user.SetInParent()
    return run


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_a_varint_reads_back(value: int) -> None:
    data = encode_varint(value)
    assert read_varint(data + b"rest", 0) == (value, len(data))


@given(names, st.lists(st.tuples(names, names), max_size=8))
def test_an_upload_request_is_framed_as_the_generated_class_encodes_it(
    collection: str, runs: list[tuple[str, str]]
) -> None:
    encoded = [_run(run_id, text).SerializeToString() for run_id, text in runs]
    framed = encode_upload_request(collection.encode(), encoded)
    generated = pb.UploadAgentRunsRequest(
        collection_id=collection, agent_runs=[_run(i, t) for i, t in runs]
    )
    assert pb.UploadAgentRunsRequest.FromString(framed) == generated
    if collection:  # an empty one is framed all the same, where the generated class omits it
        assert framed == generated.SerializeToString()
    split = decode_upload_request(framed)
    assert split.error is None and split.collection_id == collection
    assert [bytes(r) for r in split.runs] == encoded


@given(st.lists(st.tuples(names, st.integers(min_value=1, max_value=2**40)), max_size=8))
def test_an_events_request_is_framed_as_the_generated_class_encodes_it(
    events: list[tuple[str, int]],
) -> None:
    made = [
        pb.AgentRunEvent(agent_run_id=run_id, sequence=n, finish=n % 2 == 0) for run_id, n in events
    ]
    framed = encode_events_request(e.SerializeToString() for e in made)
    assert framed == pb.StreamAgentRunEventsRequest(events=made).SerializeToString()


@given(st.lists(st.tuples(names, names, st.none() | names), max_size=8))
def test_a_lease_batch_is_framed_as_the_generated_class_encodes_it(
    leases: list[tuple[str, str, str | None]],
) -> None:
    made = []
    for n, (run_id, text, task_input) in enumerate(leases):
        lease = work_pb.Lease(task_id=str(n), lease_id=run_id, attempt=n, stage=text)
        lease.deadline.seconds = n
        lease.agent_run.CopyFrom(_run(run_id, text))
        if task_input is not None:
            lease.input.string_value = task_input
        made.append(lease)
    framed = encode_lease_batch(
        (
            _without(lease, "agent_run", "input").SerializeToString(),
            lease.agent_run.SerializeToString(),
            lease.input.SerializeToString() if lease.HasField("input") else None,
        )
        for lease in made
    )
    generated = work_pb.WorkResponse(leases=work_pb.LeaseBatch(leases=made))
    assert work_pb.WorkResponse.FromString(framed) == generated
    assert len(framed) == generated.ByteSize()


def _without(lease: work_pb.Lease, *fields: str) -> work_pb.Lease:
    copy = work_pb.Lease()
    copy.CopyFrom(lease)
    for name in fields:
        copy.ClearField(name)
    return copy


@given(st.binary(max_size=64))
def test_the_upload_splitter_never_raises_and_says_what_is_wrong(data: bytes) -> None:
    split = decode_upload_request(data)
    assert split.size == len(data)
    if split.error is not None:
        assert split.error.startswith("UploadAgentRunsRequest: malformed message: ")


def test_the_codes_are_grpcs_by_number() -> None:
    for status in grpc.StatusCode:
        assert Code(status.value[0]).name == status.name
    assert code_name(10) == "ABORTED" and code_name(99) == "99"
