"""Live runs (issue 17, first step): events in a per-run sequence over StreamAgentRunEvents, on
both engines: resends acknowledged as duplicates, gaps refused with where to resume, a live run
read as it stands, finishing once, the workflow entered at the finish; and the real runs replayed
message by message ending equal to the same runs uploaded whole."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from agentrun import AgentRun, AgentRunWriter, Client
from agentrun._convert import agent_run_from_proto, agent_run_to_proto
from agentrun.chat import AssistantMessage, UserMessage
from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.v1 import ingestion_service_pb2_grpc as pb_grpc
from agentrun.v1 import orchestrator_service_pb2 as orch_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orch_grpc
from agentrun.v1 import workflow_pb2
from agentrun_server import IngestionLimits, Server, ServerConfig

from ..processes import ServerProcess
from .test_orchestrator import RawWorker

STORED, DUPLICATE, REFUSED = (
    pb.EVENT_STATUS_STORED,
    pb.EVENT_STATUS_DUPLICATE,
    pb.EVENT_STATUS_REFUSED,
)


def _message(role: str, text: str) -> run_pb.ChatMessage:
    message = run_pb.ChatMessage(text=text)
    getattr(message, role).SetInParent()
    return message


def _event(
    run_id: str,
    sequence: int,
    collection_id: str = "",
    messages: Sequence[run_pb.ChatMessage] = (),
    finish: bool = False,
    **patch: object,
) -> pb.AgentRunEvent:
    body = run_pb.AgentRun(**patch)  # type: ignore[arg-type]
    if messages:
        body.transcripts.add(key="main", messages=messages)
    return pb.AgentRunEvent(
        agent_run_id=run_id,
        sequence=sequence,
        collection_id=collection_id,
        patch=body,
        finish=finish,
    )


@contextlib.asynccontextmanager
async def _server_with(database: str, limits: IngestionLimits) -> AsyncIterator[Server]:
    """A server with these limits (say, live runs abandoned after seconds without an event)."""
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, limits=limits))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace_seconds=1)


class Stream:
    """One StreamAgentRunEvents stream: send a batch, get its acks."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = pb_grpc.IngestionServiceStub(channel).StreamAgentRunEvents()

    async def send(self, *events: pb.AgentRunEvent) -> list[pb.AgentRunEventAck]:
        await self.call.write(pb.StreamAgentRunEventsRequest(events=events))
        response = await self.call.read()
        assert len(response.acks) == len(events)
        return list(response.acks)


async def test_a_live_run_grows_in_sequence_and_enters_the_workflow_when_it_finishes(
    server: Server,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingestion = pb_grpc.IngestionServiceStub(channel)
        orchestrator = orch_grpc.OrchestratorServiceStub(channel)
        await orchestrator.ApplyWorkflow(
            orch_pb.ApplyWorkflowRequest(
                workflow=workflow_pb2.Workflow(name="w", stages=[workflow_pb2.Stage(name="s")])
            )
        )
        collection = (
            await ingestion.CreateCollection(pb.CreateCollectionRequest(name="c", workflow="w"))
        ).collection
        stream = Stream(channel)
        (opened,) = await stream.send(
            _event("r", 1, collection.id, [_message("user", "2+2?")], name="task-17")
        )
        assert (opened.status, opened.next_sequence) == (STORED, 2)
        second = _event("r", 2, messages=[_message("assistant", "4")])
        assert [a.status for a in await stream.send(second, second)] == [STORED, DUPLICATE]
        (gap,) = await stream.send(_event("r", 4, messages=[_message("user", "late")]))
        assert (gap.status, gap.code, gap.next_sequence) == (
            REFUSED,
            code_pb2.FAILED_PRECONDITION,
            3,
        )
        assert "expects 3" in gap.message

        live = (await ingestion.GetAgentRun(pb.GetAgentRunRequest(agent_run_id="r"))).agent_run
        assert live.state == pb.AGENT_RUN_STATE_RUNNING and live.event_count == 2
        assert live.agent_run.name == "task-17"
        assert [m.text for m in live.agent_run.transcripts[0].messages] == ["2+2?", "4"]
        backlog = await orchestrator.GetBacklog(orch_pb.GetBacklogRequest(workflow="w"))
        assert backlog.stages[0].ready_count == 0  # not in the workflow while running

        scores = {"reward": run_pb.Score(double_value=1.0)}
        finish = _event("r", 3, finish=True, scores=scores)
        assert [a.status for a in await stream.send(finish)] == [STORED]
        assert [a.status for a in await stream.send(finish)] == [DUPLICATE]  # finishing twice
        (after,) = await stream.send(_event("r", 4, messages=[_message("user", "more")]))
        assert (after.status, after.code) == (REFUSED, code_pb2.FAILED_PRECONDITION)
        assert "finished" in after.message

        done = (await ingestion.GetAgentRun(pb.GetAgentRunRequest(agent_run_id="r"))).agent_run
        assert done.state == pb.AGENT_RUN_STATE_FINISHED and done.event_count == 3
        assert done.agent_run.scores["reward"].double_value == 1.0
        backlog = await orchestrator.GetBacklog(orch_pb.GetBacklogRequest(workflow="w"))
        assert backlog.stages[0].ready_count == 1  # entered once
        listed = await ingestion.ListAgentRuns(pb.ListAgentRunsRequest(collection_id=collection.id))
        assert [r.agent_run.id for r in listed.agent_runs] == ["r"]
        stream.call.cancel()
        counted = await asyncio.to_thread(
            lambda: {
                status: server.registry.get_sample_value(
                    "agentrun_ingest_live_events_total", {"status": status}
                )
                for status in ("stored", "duplicate", "refused")
            }
        )
        assert counted == {"stored": 3, "duplicate": 2, "refused": 2}
        finished = server.registry.get_sample_value("agentrun_ingest_live_runs_finished_total")
        assert finished == 1


async def test_events_the_server_cannot_take_are_refused_each_with_its_reason(
    server: Server,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingestion = pb_grpc.IngestionServiceStub(channel)
        collection = (
            await ingestion.CreateCollection(pb.CreateCollectionRequest(name="c"))
        ).collection
        whole = pb.UploadAgentRunsRequest(
            collection_id=collection.id,
            agent_runs=[
                run_pb.AgentRun(
                    id="whole",
                    transcripts=[run_pb.Transcript(key="t", messages=[_message("user", "hi")])],
                )
            ],
        )
        await ingestion.UploadAgentRuns(iter([whole]))
        stream = Stream(channel)
        roleless = _event("bad", 1, collection.id)
        roleless.patch.transcripts.add(key="t").messages.add(text="no role")
        acks = await stream.send(
            _event("x", 1, "no-such-collection", [_message("user", "hi")]),
            _event("y", 1, "", [_message("user", "hi")]),
            _event("whole", 1, collection.id, [_message("user", "hi")]),
            _event("z", 2, collection.id, [_message("user", "hi")]),
            _event("empty", 1, collection.id, finish=True),
            roleless,
            _event("ok", 1, collection.id, [_message("user", "hi")], finish=True),
        )
        assert [(a.status, a.code) for a in acks] == [
            (REFUSED, code_pb2.NOT_FOUND),
            (REFUSED, code_pb2.INVALID_ARGUMENT),
            (REFUSED, code_pb2.ALREADY_EXISTS),
            (REFUSED, code_pb2.FAILED_PRECONDITION),
            (REFUSED, code_pb2.INVALID_ARGUMENT),
            (REFUSED, code_pb2.INVALID_ARGUMENT),
            (STORED, 0),
        ]
        assert "collection_id: required" in acks[1].message
        assert "uploaded whole" in acks[2].message
        assert "first event is sequence 1" in acks[3].message
        assert "no transcript" in acks[4].message
        assert "role" in acks[5].message
        count = await ingestion.CountAgentRuns(
            pb.CountAgentRunsRequest(collection_id=collection.id)
        )
        assert count.count == 2  # "whole" and "ok": nothing of the refused ones
        stream.call.cancel()


def _events_of(run: AgentRun, collection_id: str) -> list[pb.AgentRunEvent]:
    """A run replayed as a live run: its name, metadata, scores and empty transcripts first, then
    one event per message, the last one finishing it."""
    whole = agent_run_to_proto(run)
    first = run_pb.AgentRun()
    first.CopyFrom(whole)
    for transcript in first.transcripts:
        del transcript.messages[:]
    events = [pb.AgentRunEvent(agent_run_id=run.id, sequence=1, collection_id=collection_id)]
    events[0].patch.CopyFrom(first)
    for transcript in whole.transcripts:
        for message in transcript.messages:
            event = pb.AgentRunEvent(agent_run_id=run.id, sequence=len(events) + 1)
            event.patch.transcripts.add(key=transcript.key).messages.append(message)
            events.append(event)
    events[-1].finish = True
    return events


async def test_real_runs_replayed_message_by_message_equal_the_runs_uploaded_whole(
    server: Server, real_runs: list[AgentRun]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingestion = pb_grpc.IngestionServiceStub(channel)
        collection = (
            await ingestion.CreateCollection(pb.CreateCollectionRequest(name="live"))
        ).collection
        stream = Stream(channel)
        runs = [run for run in real_runs if any(t.messages for t in run.transcripts.values())][:40]
        for run in runs:
            events = _events_of(run, collection.id)
            for start in range(0, len(events), 50):
                acks = await stream.send(*events[start : start + 50])
                assert {a.status for a in acks} == {STORED}, acks
        stream.call.cancel()
        for run in runs:
            stored = await ingestion.GetAgentRun(pb.GetAgentRunRequest(agent_run_id=run.id))
            assert stored.agent_run.state == pb.AGENT_RUN_STATE_FINISHED
            assert stored.agent_run.agent_run == agent_run_to_proto(run), run.id
            back = agent_run_from_proto(stored.agent_run.agent_run, type(run.metadata))
            assert back.text == run.text


async def test_a_silent_run_reads_as_abandoned_until_its_next_event_reopens_it(
    database: str,
) -> None:
    async with (
        _server_with(database, IngestionLimits(live_run_timeout_seconds=0.5)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        ingestion = pb_grpc.IngestionServiceStub(channel)
        collection = (
            await ingestion.CreateCollection(pb.CreateCollectionRequest(name="c"))
        ).collection
        stream = Stream(channel)
        for run_id in ("quiet", "done"):
            await stream.send(
                _event(run_id, 1, collection.id, [_message("user", "hi")], finish=run_id == "done")
            )

        async def listed(state: int) -> list[str]:
            page = await ingestion.ListAgentRuns(
                pb.ListAgentRunsRequest(collection_id=collection.id, state=state)
            )
            return [r.agent_run.id for r in page.agent_runs]

        def gauge() -> dict[str, float | None]:  # read as a scrape reads it, off the loop
            return {
                state: server.registry.get_sample_value("agentrun_live_runs", {"state": state})
                for state in ("running", "abandoned")
            }

        assert await listed(pb.AGENT_RUN_STATE_RUNNING) == ["quiet"]
        assert await listed(pb.AGENT_RUN_STATE_FINISHED) == ["done"]
        assert await asyncio.to_thread(gauge) == {"running": 1, "abandoned": 0}
        await asyncio.sleep(0.7)
        assert await listed(pb.AGENT_RUN_STATE_ABANDONED) == ["quiet"]
        assert await listed(pb.AGENT_RUN_STATE_RUNNING) == []
        assert await asyncio.to_thread(gauge) == {"running": 0, "abandoned": 1}
        got = await ingestion.GetAgentRun(pb.GetAgentRunRequest(agent_run_id="quiet"))
        assert got.agent_run.state == pb.AGENT_RUN_STATE_ABANDONED
        (ack,) = await stream.send(_event("quiet", 2, messages=[_message("assistant", "back")]))
        assert ack.status == STORED
        assert await listed(pb.AGENT_RUN_STATE_RUNNING) == ["quiet"]
        assert await listed(0) == ["quiet", "done"]
        assert await asyncio.to_thread(gauge) == {"running": 1, "abandoned": 0}
        stream.call.cancel()


async def test_a_watcher_sees_each_event_in_order_within_a_second(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingestion = pb_grpc.IngestionServiceStub(channel)
        collection = (
            await ingestion.CreateCollection(pb.CreateCollectionRequest(name="c"))
        ).collection
        stream = Stream(channel)
        await stream.send(_event("w", 1, collection.id, [_message("user", "step 0")]))
        seen: list[tuple[int, str, float]] = []
        states: list[int] = []

        async def watch() -> None:
            call = ingestion.WatchAgentRun(pb.WatchAgentRunRequest(agent_run_id="w"))
            async for response in call:
                states.append(response.state)
                for event in response.events:
                    text = event.patch.transcripts[0].messages[0].text
                    seen.append((event.sequence, text, time.monotonic()))

        watcher = asyncio.create_task(watch())
        sent: dict[int, float] = {}
        for sequence in range(2, 6):
            await asyncio.sleep(0.2)
            sent[sequence] = time.monotonic()
            await stream.send(
                _event(
                    "w",
                    sequence,
                    messages=[_message("assistant", f"step {sequence}")],
                    finish=sequence == 5,
                )
            )
        async with asyncio.timeout(5):
            await watcher  # it ends once the run finished and every event went out
        assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
        assert seen[0][1] == "step 0" and seen[-1][1] == "step 5"
        assert max(at - sent[s] for s, _, at in seen[1:]) < 1.0
        assert states[0] == pb.AGENT_RUN_STATE_RUNNING and states[-1] == pb.AGENT_RUN_STATE_FINISHED
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            async for _ in ingestion.WatchAgentRun(pb.WatchAgentRunRequest(agent_run_id="nope")):
                pass
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        stream.call.cancel()


async def test_a_watcher_gets_a_run_of_many_big_events_in_answers_within_the_message_limit(
    tmp_path: Path,
) -> None:
    limit = 1024 * 1024
    database = f"sqlite:///{tmp_path / 'a.db'}"
    async with (
        _server_with(database, IngestionLimits(max_message_bytes=limit)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        ingestion = pb_grpc.IngestionServiceStub(channel)
        collection = (
            await ingestion.CreateCollection(pb.CreateCollectionRequest(name="c"))
        ).collection
        stream = Stream(channel)
        big = "x" * 300_000  # 12 events of 300 KB: 3.6 MB, over the 1 MB limit together
        for sequence in range(1, 13):
            messages = [_message("user", f"{sequence} {big}")]
            (ack,) = await stream.send(
                _event("big", sequence, collection.id, messages, finish=sequence == 12)
            )
            assert ack.status == pb.EVENT_STATUS_STORED, ack.message
        stream.call.cancel()
        sizes, sequences = [], []
        async for response in ingestion.WatchAgentRun(pb.WatchAgentRunRequest(agent_run_id="big")):
            sizes.append(response.ByteSize())
            sequences += [e.sequence for e in response.events]
        assert sequences == list(range(1, 13))  # all of them, in order, each once
        assert len(sizes) > 1 and max(sizes) <= limit
        with pytest.raises(grpc.aio.AioRpcError) as whole:
            await ingestion.GetAgentRun(pb.GetAgentRunRequest(agent_run_id="big"))
        assert whole.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the 1,048,576-byte message limit" in whole.value.details(), whole.value
        assert "WatchAgentRun" in whole.value.details()
        basic = await ingestion.GetAgentRun(
            pb.GetAgentRunRequest(agent_run_id="big", view=pb.AGENT_RUN_VIEW_BASIC)
        )
        assert basic.agent_run.message_count == 12


async def test_agentrun_tail_prints_messages_as_they_land_and_ends_with_the_run(
    server: Server,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingestion = pb_grpc.IngestionServiceStub(channel)
        collection = (
            await ingestion.CreateCollection(pb.CreateCollectionRequest(name="c"))
        ).collection
        stream = Stream(channel)
        await stream.send(_event("t", 1, collection.id, [_message("user", "what is 2+2?")]))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
        tail = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentrun._cli",
            "tail",
            "t",
            "--server",
            f"127.0.0.1:{server.port}",
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert tail.stdout is not None
        async with asyncio.timeout(20):
            assert await tail.stdout.readline() == b"[1] main user: what is 2+2?\n"
            assert await tail.stdout.readline() == b"-- run t is running\n"
            await stream.send(
                _event(
                    "t",
                    2,
                    messages=[_message("assistant", "4\x1b[31m")],
                    finish=True,
                    scores={"reward": run_pb.Score(double_value=1.0)},
                )
            )
            rest = (await tail.stdout.read()).decode().splitlines()
            assert await tail.wait() == 0
        assert rest == [
            "[2] main assistant: 4\\x1b[31m",  # escaped, never sent to the terminal
            "[2] score reward = 1.0",
            "-- run t is finished",
        ]
        stream.call.cancel()


async def test_a_collection_may_enter_its_abandoned_runs_into_the_workflow_once(
    database: str,
) -> None:
    async with _server_with(database, IngestionLimits(live_run_timeout_seconds=0.4)) as server:
        url = f"127.0.0.1:{server.port}"
        worker = RawWorker(url)
        try:
            async with grpc.aio.insecure_channel(url) as channel:
                ingestion = pb_grpc.IngestionServiceStub(channel)
                orchestrator = orch_grpc.OrchestratorServiceStub(channel)
                await orchestrator.ApplyWorkflow(
                    orch_pb.ApplyWorkflowRequest(
                        workflow=workflow_pb2.Workflow(
                            name="wf", stages=[workflow_pb2.Stage(name="s")]
                        )
                    )
                )
                entering, waiting = [
                    (
                        await ingestion.CreateCollection(
                            pb.CreateCollectionRequest(
                                name=name, workflow="wf", enter_workflow_on_abandon=flag
                            )
                        )
                    ).collection
                    for name, flag in (("entering", True), ("waiting", False))
                ]
                assert (entering.enter_workflow_on_abandon, waiting.enter_workflow_on_abandon) == (
                    True,
                    False,
                )
                stream = Stream(channel)
                await stream.send(
                    _event("gone", 1, entering.id, [_message("user", "step 0")], name="gone"),
                    _event("empty", 1, entering.id, name="no messages yet"),
                    _event("kept", 1, waiting.id, [_message("user", "step 0")]),
                )

                async def tasks_of(run_id: str) -> list[Any]:
                    listed = await orchestrator.ListTasks(orch_pb.ListTasksRequest(workflow="wf"))
                    return [t for t in listed.tasks if t.agent_run_id == run_id]

                for _ in range(200):  # the sweep runs every 0.1 s here
                    if await tasks_of("gone"):
                        break
                    await asyncio.sleep(0.05)
                # Entered once, as it stood: the other collection's run and the run with nothing
                # for a stage to read (no transcript) wait for their finish.
                assert len(await tasks_of("gone")) == 1
                assert await tasks_of("empty") == [] and await tasks_of("kept") == []
                await worker.subscribe(["s"], credits=1)
                (lease,) = (await worker.next("leases")).leases
                assert lease.agent_run.id == "gone"
                assert [m.text for m in lease.agent_run.transcripts[0].messages] == ["step 0"]
                assert (await worker.complete(lease.task_id, lease.lease_id)).code == 0
                entered = await asyncio.to_thread(  # off the loop: a scrape reads on it
                    server.registry.get_sample_value,
                    "agentrun_ingest_live_runs_entered_on_abandon_total",
                )
                assert entered == 1

                # An event reopens it; its finish does not enter it again.
                await stream.send(
                    _event("gone", 2, messages=[_message("assistant", "back")]),
                    _event("gone", 3, finish=True),
                    _event("empty", 2, messages=[_message("user", "at last")], finish=True),
                    _event("kept", 2, finish=True),
                )
                assert [t.state for t in await tasks_of("gone")] == [workflow_pb2.TASK_STATE_DONE]
                assert len(await tasks_of("empty")) == 1 and len(await tasks_of("kept")) == 1
                stream.call.cancel()
        finally:
            await worker.close()


def test_agentrun_tail_on_a_terminal_draws_with_rich_and_shows_timestamps(
    tmp_path: Path,
) -> None:
    with ServerProcess(tmp_path / "agentrun.db") as server, Client(server.url) as client:
        collection = client.create_collection("c").collection
        made_at = datetime(2026, 12, 1, 4, 30, 15, tzinfo=UTC)
        writer = AgentRunWriter(collection.id, server_url=server.url)
        with writer.live_run("on-a-tty") as run:
            run.append(
                "main",
                [
                    UserMessage(content="[bold]not markup[/bold]", timestamp=made_at),
                    AssistantMessage(content="4\x1b[31m"),
                ],
            )
        assert writer.finish().ok
        leader, follower = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
        env.update(TZ="UTC", COLUMNS="200", TERM="xterm-256color")
        tail = subprocess.Popen(
            [sys.executable, "-m", "agentrun._cli", "tail", "on-a-tty", "--server", server.url],
            stdout=follower,
            env=env,
        )
        os.close(follower)
        output = b""
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while chunk := os.read(leader, 65536):
                output += chunk
        os.close(leader)
        assert tail.wait(timeout=20) == 0
    drawn = output.decode()
    assert "\x1b[" in drawn  # styled by rich
    plain = re.sub(r"\x1b\[[0-9;]*m", "", drawn).replace("\r\n", "\n")
    assert "[2] 04:30:15 main user: [bold]not markup[/bold]\n" in plain  # literal, timed
    assert "main assistant: 4\\x1b[31m\n" in plain  # the run's escape escaped
    assert plain.rstrip().endswith("-- run on-a-tty is finished")
