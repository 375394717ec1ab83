"""The storage contract: OpenTelemetry traces as live runs (spans kept once, a batch one event
numbered by the server, the run finished from every span in start order once quiet after its
root), and deleted with their run."""

from __future__ import annotations

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun_server.ingestion._live import fold_finished
from agentrun_server.otlp._servicer import project, rebuild
from agentrun_server.storage import NewSpan, RunSelection, Storage, TraceBatch

from ..unit.test_otlp_mapping import EXPECTED, _roles, genai_trace

MAX_BYTES = 1 << 20


def _spans(indexes: list[int]) -> list[NewSpan]:
    spans = genai_trace()
    return [
        NewSpan(
            spans[i].span_id.hex(),
            spans[i].start_time_unix_nano,
            spans[i].SerializeToString(),
            not spans[i].parent_span_id,
        )
        for i in indexes
    ]


async def test_spans_are_kept_once_and_the_run_finishes_in_start_order(storage: Storage) -> None:
    collection, _ = await storage.create_collection("traced", "", "", 1.0)

    async def send(indexes: list[int], collection_name: str, now: float):  # type: ignore[no-untyped-def]
        batch = TraceBatch("otel-t", collection_name, _spans(indexes))
        (outcome,) = await storage.append_spans([batch], project, fold_finished, MAX_BYTES, now)
        return outcome

    first = await send([3], "traced", 2.0)
    assert (first.stored, first.duplicates, first.opened) == (1, 0, True)
    # A retry with one new span, sent by a process that names another collection: joins.
    second = await send([3, 1, 2], "elsewhere", 3.0)
    assert (second.stored, second.duplicates, second.opened) == (2, 1, False)
    assert (await send([1, 2], "traced", 4.0)).duplicates == 2
    page = await storage.events_after("otel-t", 0, 10)
    assert [seq for seq, _ in page.events] == [1, 2]
    assert page.run.collection_id == collection.id
    # No root yet: nothing finishes, however quiet.
    assert await storage.finish_quiet_traces(100.0, rebuild, MAX_BYTES, 10, 100.0) == []
    await send([0], "traced", 5.0)
    assert await storage.finish_quiet_traces(5.0, rebuild, MAX_BYTES, 10, 5.5) == []  # not quiet
    assert await storage.finish_quiet_traces(6.0, rebuild, MAX_BYTES, 10, 6.0) == ["otel-t"]
    assert await storage.finish_quiet_traces(60.0, rebuild, MAX_BYTES, 10, 60.0) == []
    run = run_pb.AgentRun.FromString((await storage.get_run("otel-t")).data)
    assert _roles(run.transcripts[0]) == EXPECTED
    late = await send([2], "traced", 61.0)
    assert (late.stored, late.duplicates, late.refused) == (0, 1, None)


async def test_a_deleted_trace_run_starts_over_with_its_next_spans(storage: Storage) -> None:
    batch = TraceBatch("otel-t", "traced", _spans([1, 2]))
    (first,) = await storage.append_spans([batch], project, fold_finished, MAX_BYTES, 2.0)
    assert first.opened  # and its collection made, on first use
    collection = await storage.get_collection(name="traced")
    deleted = await storage.delete_runs(RunSelection(run_ids=["otel-t"]), False, 10, 3.0)
    assert deleted.run_ids == ["otel-t"]
    (again,) = await storage.append_spans([batch], project, fold_finished, MAX_BYTES, 4.0)
    assert (again.stored, again.duplicates, again.opened) == (2, 0, True)
    # Its collection deleted too: the next spans make it again, rather than being refused.
    while (await storage.delete_collection(collection.id, False, 10, 5.0)).more:
        pass
    (anew,) = await storage.append_spans([batch], project, fold_finished, MAX_BYTES, 6.0)
    assert (anew.stored, anew.opened) == (2, True)
    assert (await storage.get_collection(name="traced")).id != collection.id
