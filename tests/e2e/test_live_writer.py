"""Live runs from the Python SDK (issue 17): `AgentRunWriter.live_run`, its appends acknowledged
in order, a run resumed by another writer, an agent process killed with SIGKILL and resumed from
its spool, and 50 live runs appending through a server killed with SIGKILL and restarted: every
event stored once, in order."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from agentrun import AgentRunWriter, Client, LiveRunError, agent_run_from_proto
from agentrun._retry import Backoff
from agentrun.chat import AssistantMessage, UserMessage
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.v1 import workflow_pb2

from ..fakes import serve_fake
from ..processes import ServerProcess


def _texts(client: Client, run_id: str) -> tuple[int, list[str], pb.StoredAgentRun]:
    stored = client.ingestion.GetAgentRun(pb.GetAgentRunRequest(agent_run_id=run_id)).agent_run
    texts = [m.text for t in stored.agent_run.transcripts for m in t.messages]
    return stored.state, texts, stored


def test_a_live_run_from_the_writer_grows_then_finishes_into_the_workflow(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "agentrun.db") as server, Client(server.url) as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name="w", stages=[workflow_pb2.Stage(name="grade")])
        )
        collection = client.create_collection("live", workflow="w").collection
        writer = AgentRunWriter(collection.id, server_url=server.url)
        made_at = datetime(2026, 12, 1, 4, 30, 15, 123456, tzinfo=UTC)
        with writer.live_run(name="task-17", metadata={"model": "m"}) as run:
            for step in range(5):
                question = UserMessage(content=f"q{step}", timestamp=made_at)
                run.append("main", [question, AssistantMessage(content=f"a{step}")])
            writer._events.flush(10)  # type: ignore[union-attr]
            state, texts, _ = _texts(client, run.agent_run_id)
            assert state == pb.AGENT_RUN_STATE_RUNNING and len(texts) == 10
            assert client.backlog("w")[0].ready_count == 0
            run.set_scores(reward=1.0)
        with pytest.raises(LiveRunError):
            run.append("main", [UserMessage(content="late")])
        with writer.live_run("from-dicts") as plain:  # OpenAI-style dicts, as Docent takes them
            plain.append(
                "main",
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            )
            with pytest.raises(ValueError, match="role"):
                plain.append("main", [{"content": "who said this?"}])
        with pytest.raises(ValueError), writer.live_run(name="crashes") as crashed:
            crashed.append("main", [UserMessage(content="about to fail")])
            raise ValueError("tool exploded")
        writer.finish()
        state, texts, stored = _texts(client, run.agent_run_id)
        assert state == pb.AGENT_RUN_STATE_FINISHED
        assert texts == [f"{kind}{step}" for step in range(5) for kind in "qa"]
        assert stored.agent_run.name == "task-17"
        assert stored.agent_run.scores["reward"].double_value == 1.0
        assert stored.agent_run.metadata.fields["model"].value.string_value == "m"
        first, second = agent_run_from_proto(stored.agent_run).transcripts["main"].messages[:2]
        assert first.timestamp == made_at  # kept on the wire, to the µs
        assert second.timestamp is not None and second.timestamp > made_at  # stamped at append
        state, _, failed = _texts(client, crashed.agent_run_id)
        assert state == pb.AGENT_RUN_STATE_FINISHED
        error = failed.agent_run.metadata.fields["error"].value.string_value
        assert error == "ValueError: tool exploded"
        assert _texts(client, "from-dicts")[1] == ["hi", "hello"]
        assert client.backlog("w")[0].ready_count == 3  # each entered once, at its finish


def test_large_events_travel_in_messages_under_the_servers_limit(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "agentrun.db") as server, Client(server.url) as client:
        collection = client.create_collection("live").collection
        writer = AgentRunWriter(collection.id, server_url=server.url)
        big = "x" * (3 * 1024 * 1024)
        with writer.live_run("big") as run:
            for _ in range(6):  # 19 MB queued at once: over the server's 17 MiB in one message
                run.append("main", [UserMessage(content=big)])
            with pytest.raises(LiveRunError, match="over 16,777,216"):
                run.append("main", [UserMessage(content="y" * (17 * 1024 * 1024))])
        assert writer.finish().ok
        basic = pb.GetAgentRunRequest(agent_run_id="big", view=pb.AGENT_RUN_VIEW_BASIC)
        stored = client.ingestion.GetAgentRun(basic).agent_run  # too large to read whole
        assert stored.state == pb.AGENT_RUN_STATE_FINISHED
        assert stored.event_count == 8  # open, six appends, finish


def test_another_writer_resumes_a_run_where_its_events_stopped(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "agentrun.db") as server, Client(server.url) as client:
        collection = client.create_collection("live").collection
        first = AgentRunWriter(collection.id, server_url=server.url)
        run = first.live_run("resumed-run", name="r")
        run.append("main", [UserMessage(content="one")])
        first.finish()  # the process ends; the run stays open
        second = AgentRunWriter(collection.id, server_url=server.url)
        with second.live_run("resumed-run") as again:
            again.append("main", [AssistantMessage(content="two")])
        second.finish()
        state, texts, stored = _texts(client, "resumed-run")
        assert (state, texts, stored.event_count) == (
            pb.AGENT_RUN_STATE_FINISHED,
            ["one", "two"],
            4,  # open and "one" (first writer), "two" and finish (second)
        )
        third = AgentRunWriter(collection.id, server_url=server.url)
        with pytest.raises(LiveRunError, match="finished"):
            third.live_run("resumed-run")
        third.finish()


def test_fifty_live_runs_append_through_a_server_killed_and_restarted(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "agentrun.db").start()
    try:
        with Client(server.url) as client:
            collection = client.create_collection("live").collection
        writer = AgentRunWriter(collection.id, server_url=server.url)
        steps = 30
        halfway = threading.Barrier(51)

        def agent(i: int) -> None:
            with writer.live_run(f"agent-{i}") as run:
                for step in range(steps):
                    run.append("main", [AssistantMessage(content=f"{i}:{step}")])
                    if step == steps // 2:
                        halfway.wait(timeout=60)
                    time.sleep(0.01)

        agents = [threading.Thread(target=agent, args=(i,)) for i in range(50)]
        for thread in agents:
            thread.start()
        halfway.wait(timeout=60)
        server.kill()
        time.sleep(0.5)
        server.start()
        for thread in agents:
            thread.join(timeout=120)
        summary = writer.finish()
        assert summary.ok, summary
        with Client(server.url) as client:
            for i in range(50):
                state, texts, stored = _texts(client, f"agent-{i}")
                assert texts == [f"{i}:{step}" for step in range(steps)], i
                assert state == pb.AGENT_RUN_STATE_FINISHED
                assert stored.event_count == steps + 2  # open, the appends, finish
    finally:
        server.terminate()


AGENT = textwrap.dedent(
    """
    import time
    from agentrun import AgentRunWriter
    from agentrun.chat import AssistantMessage
    writer = AgentRunWriter({collection!r}, server_url={url!r}, spool_dir={spool!r})
    run = writer.live_run("killed-agent", name="long task")
    for step in range(100_000):
        run.append("main", [AssistantMessage(content=f"step {{step}}")])
        print(step, flush=True)
        time.sleep(0.005)
    """
)


def test_an_agent_killed_mid_run_is_resumed_from_its_spool_with_nothing_lost(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    server = ServerProcess(tmp_path / "agentrun.db").start()
    try:
        with Client(server.url) as client:
            client.apply_workflow(
                workflow_pb2.Workflow(name="w", stages=[workflow_pb2.Stage(name="grade")])
            )
            collection = client.create_collection("live", workflow="w").collection.id
        script = AGENT.format(collection=collection, url=server.url, spool=str(spool))
        agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert agent.stdout is not None
        returned = -1  # the last step whose append returned
        for line in agent.stdout:
            returned = int(line)
            if returned == 40:
                server.kill()  # what the agent appends from here is acknowledged by no one
            if returned == 80:
                agent.send_signal(signal.SIGKILL)
                break
        agent.wait(timeout=10)
        agent.stdout.close()
        assert agent.returncode == -signal.SIGKILL
        assert list(spool.glob("events-*.log")), "the agent left no events in its spool"

        server.start()
        with Client(server.url) as client:
            _, texts, _ = _texts(client, "killed-agent")
            assert 0 < len(texts) <= 41 < returned, "the spool had nothing unacknowledged to send"
        writer = AgentRunWriter(collection, server_url=server.url, spool_dir=spool)
        assert writer.unfinished_live_runs == ("killed-agent",)
        with writer.live_run("killed-agent") as run:  # continues after what the spool holds
            run.append("main", [AssistantMessage(content="resumed")])
        summary = writer.finish()
        assert summary.ok, summary
        assert summary.events_replayed > returned - 41
        assert not list(spool.glob("events-*.log"))  # every event acknowledged and removed

        with Client(server.url) as client:
            state, texts, stored = _texts(client, "killed-agent")
            assert state == pb.AGENT_RUN_STATE_FINISHED
            # Every append that returned, once and in order; at most the one being made at the
            # kill besides (on disk before its print), then the resumed writer's.
            steps = texts[:-1]
            assert steps == [f"step {i}" for i in range(len(steps))]
            assert returned + 1 <= len(steps) <= returned + 2
            assert texts[-1] == "resumed"
            assert stored.agent_run.name == "long task"
            assert stored.event_count == len(steps) + 3  # open, the steps, resumed, finish
            backlog = client.backlog("w")[0]
            assert backlog.ready_count == 1  # entered the workflow once, at its finish
    finally:
        server.terminate()


def test_two_writers_appending_to_one_run_lose_nothing_silently(tmp_path: Path) -> None:
    """The attack of issue 23: two writers resume one live run and each appends 20 messages; the
    server held one writer's 20 and acknowledged the other's as duplicates, both summaries
    `ok`. Now the other's events are refused as conflicts (ABORTED), said on its `LiveRun` and in
    its summary, never counted as duplicates."""
    with ServerProcess(tmp_path / "agentrun.db") as server, Client(server.url) as client:
        collection = client.create_collection("live").collection
        opener = AgentRunWriter(collection.id, server_url=server.url)
        opener.live_run("shared", name="shared").append("main", [UserMessage(content="start")])
        assert opener.finish().ok  # the run stays open
        first = AgentRunWriter(collection.id, server_url=server.url)
        second = AgentRunWriter(collection.id, server_url=server.url)
        # Both resume where the run stands: at the same sequence number.
        mine, theirs = first.live_run("shared"), second.live_run("shared")
        for step in range(20):
            mine.append("main", [AssistantMessage(content=f"first {step}")])
        assert first.finish().ok
        for step in range(20):
            try:
                theirs.append("main", [AssistantMessage(content=f"second {step}")])
            except LiveRunError as refused:
                assert "conflicts with another writer" in str(refused)
                break
            second._events.flush(10)  # type: ignore[union-attr]
        else:
            pytest.fail("the second writer was never told of the conflict")
        assert theirs.conflict is not None and theirs.conflict.code == "ABORTED"
        summary = second.finish()
        assert not summary.ok
        assert summary.events_duplicate == 0
        assert summary.events_refused[0].code == "ABORTED"
        assert "holds a different event" in summary.events_refused[0].message
        _, texts, _ = _texts(client, "shared")
        assert texts == ["start", *(f"first {step}" for step in range(20))]


class BreakingEvents:
    """A real gRPC server whose first event stream ends INTERNAL at its first message (as a
    server killed mid-write can end one, grpc/grpc#36066); later streams store every event."""

    def __init__(self) -> None:
        self.streams = 0
        self.stored: list[tuple[str, int]] = []

    async def stream(
        self,
        requests: AsyncIterator[pb.StreamAgentRunEventsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamAgentRunEventsResponse]:
        self.streams += 1
        first = self.streams == 1
        async for request in requests:
            if first:
                await context.abort(grpc.StatusCode.INTERNAL, "Stream removed")
            acks = []
            for event in request.events:
                self.stored.append((event.agent_run_id, event.sequence))
                acks.append(
                    pb.AgentRunEventAck(
                        agent_run_id=event.agent_run_id,
                        sequence=event.sequence,
                        status=pb.EVENT_STATUS_STORED,
                        next_sequence=event.sequence + 1,
                    )
                )
            yield pb.StreamAgentRunEventsResponse(acks=acks)

    async def serve(self) -> grpc.aio.Server:
        handler = grpc.stream_stream_rpc_method_handler(
            self.stream,
            request_deserializer=pb.StreamAgentRunEventsRequest.FromString,
            response_serializer=pb.StreamAgentRunEventsResponse.SerializeToString,
        )
        server, self.port = await serve_fake(
            "agentrun.v1.IngestionService", {"StreamAgentRunEvents": handler}
        )
        return server


async def test_an_event_stream_that_ends_internal_reconnects_and_resends() -> None:
    # The SDK's one retry policy: a stream gives up only when refused; before, the event sender
    # took INTERNAL as a refusal and stopped sending for good.
    fake = BreakingEvents()
    server = await fake.serve()
    try:
        writer = AgentRunWriter(
            "c",
            server_url=f"127.0.0.1:{fake.port}",
            backoff=Backoff(initial_seconds=0.01, max_seconds=0.05),
            shutdown_timeout=10,
        )
        run = writer.live_run(name="flaky")
        run.append("main", [UserMessage(content="hello")])
        run.append("main", [AssistantMessage(content="hi")])
        run.finish()
        summary = await asyncio.to_thread(writer.finish)
    finally:
        await server.stop(0)
    assert fake.streams >= 2
    # The run's first event (its name), two appends, its finish: each stored once, none lost.
    assert summary.ok and summary.events_stored == 4 and summary.events_undelivered == 0, summary
    assert sorted(sequence for _, sequence in fake.stored) == [1, 2, 3, 4]
