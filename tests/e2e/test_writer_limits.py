"""The writer refuses what the server would refuse, in the caller, and a damaged or stale spool
never bricks a writer: what is in it is delivered, reported, or both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    InvalidRunError,
    Transcript,
    agent_run_to_proto,
)
from agentrun._convert import value_to_proto
from agentrun._spool import Spool
from agentrun.chat import UserMessage
from agentrun.v1 import agent_run_pb2

from ..processes import ServerProcess
from .test_writer import stored_ids


def make_run(run_id: str, key: str = "t", **metadata: Any) -> AgentRun:
    return AgentRun(
        id=run_id,
        transcripts={key: Transcript(messages=[UserMessage(content="hi")])},
        metadata=BaseAgentRunMetadata(scores={"reward": 1.0}, **metadata),
    )


def nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"deeper": value}
    return value


def with_metadata_scores() -> agent_run_pb2.AgentRun:
    run = agent_run_to_proto(make_run("scores-in-metadata"))
    run.metadata.fields["scores"].value.string_value = "not a score"
    return run


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A server and the id of its collection "c"."""
    with ServerProcess(tmp_path / "agentrun.db") as process, Client(process.url) as client:
        yield process, client.create_collection("c").collection.id


@pytest.mark.parametrize(
    ("run", "field"),
    [
        (make_run("deep", config=nested(21)), "metadata.fields['config']"),
        (
            make_run("deep-list", trace=[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]),
            "metadata.fields",
        ),
        (with_metadata_scores(), "metadata.fields['scores']"),
        (make_run("\x1b[31mred"), "id"),
        (make_run("rtl", key="evil\u202etxt"), "transcripts[0].key"),
    ],
    ids=["dict-depth", "list-depth", "scores-field", "escape-in-id", "rtl-override-in-key"],
)
def test_a_run_the_server_would_refuse_fails_in_the_caller_and_never_reaches_the_spool(
    server: tuple[ServerProcess, str],
    tmp_path: Path,
    run: AgentRun | agent_run_pb2.AgentRun,
    field: str,
) -> None:
    process, collection = server
    spool = tmp_path / "spool"
    with AgentRunWriter(collection, server_url=process.url, spool_dir=spool) as writer:
        with pytest.raises(InvalidRunError) as raised:
            writer.log_agent_runs([make_run("before"), run])
        assert raised.value.field.startswith(field)
        assert field.split(".")[0] in str(raised.value)
        assert not list(spool.glob("*.seg"))  # none of the chunk, good or bad, was spooled
        writer.log_agent_runs([make_run("after")])  # the writer carries on
    summary = writer.finish()
    assert (summary.accepted, summary.rejected, summary.ok) == (1, [], True)
    assert stored_ids(process.db) == ["after"]


def test_depth_twenty_is_within_the_limit_and_is_stored(server: tuple[ServerProcess, str]) -> None:
    process, collection = server
    with AgentRunWriter(collection, server_url=process.url) as writer:
        writer.log_agent_runs([make_run("deep-enough", config=nested(20))])
    assert writer.finish().accepted == 1
    with Client(process.url) as client:
        (run,) = client.iter_runs(collection)
    assert run.metadata.get("config") == nested(20)


def test_a_spooled_run_the_server_cannot_store_is_reported_and_never_bricks_a_writer(
    server: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    """Runs an older SDK spooled (nested past what protobuf decodes, a metadata field 'scores')
    and bytes that are no run at all: a writer on that spool starts, delivers the good run, and
    reports each of the others as rejected; the next writer finds the spool empty."""
    process, collection = server
    too_deep = agent_run_to_proto(make_run("too-deep"))
    value_to_proto(nested(40), too_deep.metadata.fields["config"].value)
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    spool.append(
        collection.encode(),
        [
            agent_run_to_proto(make_run("good")).SerializeToString(),
            too_deep.SerializeToString(),
            with_metadata_scores().SerializeToString(),
            b"\xff\xff\xff",
        ],
    )
    spool.close()

    writer = AgentRunWriter(collection, server_url=process.url, spool_dir=spool_dir)
    summary = writer.finish()
    assert (summary.replayed, summary.accepted, summary.undelivered) == (4, 1, 0)
    assert [(r.agent_run_id, r.reason) for r in summary.rejected] == [
        ("", "INVALID"),
        ("scores-in-metadata", "INVALID"),
        ("", "INVALID"),
    ]
    assert "does not decode" in summary.rejected[0].message
    assert "metadata.fields['scores']" in summary.rejected[1].message
    assert not list(spool_dir.glob("*.seg"))
    assert stored_ids(process.db) == ["good"]

    again = AgentRunWriter(collection, server_url=process.url, spool_dir=spool_dir)
    assert again.finish().replayed == 0


def test_a_torn_segment_delivers_its_whole_runs_and_the_summary_says_so(
    server: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    """Power lost after a segment's rename reached the disk but not all of its data."""
    process, collection = server
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    runs = [agent_run_to_proto(make_run(f"r{i}")).SerializeToString() for i in range(3)]
    segment = spool.append(collection.encode(), runs)
    spool.close()
    whole = segment.path.read_bytes()
    segment.path.write_bytes(whole[:-10])  # the third run cut short

    writer = AgentRunWriter(collection, server_url=process.url, spool_dir=spool_dir)
    summary = writer.finish()
    assert (summary.replayed, summary.accepted) == (2, 2)
    assert not summary.ok  # the third run is lost, and finish() says so
    (damage,) = summary.spool_damage
    assert "torn after 2 runs" in damage and segment.path.with_suffix(".bad").name in damage
    assert damage in str(summary)
    assert segment.path.with_suffix(".bad").read_bytes() == whole[:-10]  # kept to inspect
    assert not list(spool_dir.glob("*.seg"))
    assert sorted(stored_ids(process.db)) == ["r0", "r1"]
