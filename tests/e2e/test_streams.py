"""Long streams cannot lock anyone out (issue 23): every stream kind has a first-message deadline
and an idle timeout, caps in all, per client host and per API key; a watcher of a quiet run reads
nothing; revoking or expiring a key ends every stream of it within a second; and a client turned
away says why. In-process servers on real sockets, raw stubs where a client misbehaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from agentrun import AgentRunWriter
from agentrun import _live_run as live_run_module
from agentrun._convert import agent_run_to_proto
from agentrun.chat import UserMessage
from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import key_service_pb2 as key_pb
from agentrun.v1 import key_service_pb2_grpc as key_grpc
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.work import WorkStream
from agentrun_server import IngestionLimits, Server, ServerConfig
from agentrun_server.auth import new_key
from agentrun_server.orchestrator import WorkLimits

from .test_auth import _auth
from .test_fuzz import _run
from .test_hardening import Stubs, Worker, _code
from .test_live_runs import _event, _message


async def _serving(database: str, **config: Any) -> Server:
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, **config))
    await server.start()
    return server


async def _admin(server: Server, name: str = "root", **limits: Any) -> str:
    """A key made on the server's database, as `agentrun keys create --db` does."""
    record, token = new_key(name, limits.pop("scopes", ["admin"]), **limits)
    assert server._storage is not None and server._keys is not None
    await server._storage.create_key(record)
    await server._keys.reload()
    return token


async def _running_run(stubs: Stubs, collection: str, run_id: str, metadata: Any = ()) -> None:
    """A live run with one event (running)."""
    call = stubs.ingest.StreamAgentRunEvents(metadata=metadata)
    await call.write(
        ingest_pb.StreamAgentRunEventsRequest(
            events=[_event(run_id, 1, collection, [_message("user", "hello")])]
        )
    )
    (ack,) = (await call.read()).acks
    assert ack.status == ingest_pb.EVENT_STATUS_STORED
    await call.done_writing()
    await call.read()


async def _ends(call: Any, within_seconds: float) -> tuple[grpc.StatusCode, str]:
    """How a streaming call ends, read to its end within the time given."""
    async with asyncio.timeout(within_seconds):
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# --- streams that never start, or fall silent -----------------------------------------------------


@pytest.mark.parametrize("kind", ["work", "events"])
async def test_streams_that_never_start_are_closed_and_give_their_slots_back(
    tmp_path: Any, kind: str
) -> None:
    server = await _serving(
        f"sqlite:///{tmp_path / 'a.db'}",
        limits=IngestionLimits(max_event_streams_per_peer=3, first_message_seconds=0.5),
        work_limits=WorkLimits(max_streams_per_peer=3, first_message_seconds=0.5),
    )
    stubs = Stubs(server.port)
    try:
        await stubs.set_up(runs=1)
        opened: Callable[[], Any] = (
            stubs.orch.Work if kind == "work" else stubs.ingest.StreamAgentRunEvents
        )
        silent = [opened() for _ in range(3)]
        await asyncio.sleep(0.2)  # the three hold every slot of this host
        code, details = await _ends(opened(), 5)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "_per_peer=3" in details
        started = time.monotonic()
        for call in silent:
            code, details = await _ends(call, 5)
            assert code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no message for 0.5 s (first_message_seconds" in details
        assert time.monotonic() - started < 2
        if kind == "work":  # the slots are back
            worker = Worker(stubs)
            await worker.subscribe(credits=1)
            assert len(await worker.leases(1)) == 1
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_a_silent_worker_is_closed_and_a_heartbeating_one_is_not(tmp_path: Any) -> None:
    server = await _serving(
        f"sqlite:///{tmp_path / 'a.db'}", work_limits=WorkLimits(idle_seconds=0.6)
    )
    stubs = Stubs(server.port)
    try:
        collection = await stubs.set_up(runs=0)
        silent = Worker(stubs)
        subscribed = await silent.subscribe(credits=1)
        assert subscribed.idle_timeout.ToMilliseconds() == 600
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await silent.next("leases", timeout_seconds=5)
        assert closed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle_timeout" in (closed.value.details() or "")
        # The SDK's stream writes a heartbeat when it has nothing else to say: it stays.
        async with WorkStream(f"127.0.0.1:{server.port}", "wf", ["work"], credits=1) as stream:
            session = stream.subscribed.session_id  # type: ignore[union-attr]
            await asyncio.sleep(2.0)
            await stubs.upload(collection, [_run_proto("late")])
            lease = await asyncio.wait_for(anext(stream), 5)
            assert lease.agent_run.id == "late"
            assert stream.subscribed.session_id == session  # type: ignore[union-attr]
            stream.complete(lease, "")
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


def _run_proto(run_id: str) -> Any:
    run = agent_run_to_proto(_run(0))
    run.id = run_id
    return run


async def test_an_idle_event_stream_is_closed_and_the_writer_closes_its_own_first(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await _serving(
        f"sqlite:///{tmp_path / 'a.db'}", limits=IngestionLimits(stream_idle_seconds=0.6)
    )
    stubs = Stubs(server.port)
    try:
        collection = await stubs.set_up(runs=0)
        call = stubs.ingest.StreamAgentRunEvents()
        await call.write(
            ingest_pb.StreamAgentRunEventsRequest(
                events=[_event("raw", 1, collection, [_message("user", "hi")])]
            )
        )
        code, details = await _ends(call, 5)  # one ack, then silence
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stream_idle_seconds" in details
        monkeypatch.setattr(live_run_module, "IDLE_CLOSE_SECONDS", 0.2)
        writer = AgentRunWriter(collection, server_url=f"127.0.0.1:{server.port}")
        run = writer.live_run(name="pausing")  # a new run: no lookup on this loop
        run.append("main", [UserMessage(content="before a long tool call")])
        await asyncio.to_thread(writer._events.flush, 5)  # type: ignore[union-attr]
        await asyncio.sleep(1.5)  # longer than the server lets a stream idle
        gauge = server.registry.get_sample_value("agentrun_ingest_open_event_streams")
        assert gauge == 0  # the writer closed its stream with nothing to send
        run.append("main", [UserMessage(content="after it")])
        run.finish()
        summary = await asyncio.to_thread(writer.finish)
        assert summary.ok and summary.events_stored == 4 and not summary.errors, summary
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


# --- watchers cost nothing while their run is quiet -----------------------------------------------


async def test_idle_watchers_read_nothing_until_their_run_grows(database: str) -> None:
    server = await _serving(database)
    stubs = Stubs(server.port)
    storage: Any = server._storage
    reads = 0
    events_after = storage.events_after

    async def counted(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        return await events_after(*args)

    storage.events_after = counted
    try:
        collection = await stubs.set_up(runs=0)
        await _running_run(stubs, collection, "quiet")
        watchers = [
            stubs.ingest.WatchAgentRun(ingest_pb.WatchAgentRunRequest(agent_run_id="quiet"))
            for _ in range(50)
        ]
        for watcher in watchers:  # the first read: the run's event so far
            assert len((await watcher.read()).events) == 1
        await asyncio.sleep(0.5)  # other processes' notices of that event may wake them once
        first_reads = reads
        assert first_reads <= 100
        await asyncio.sleep(1.5)
        assert reads == first_reads  # polling every 0.25 s would have read 300 times more
        call = stubs.ingest.StreamAgentRunEvents()
        await call.write(
            ingest_pb.StreamAgentRunEventsRequest(
                events=[_event("quiet", 2, collection, [_message("assistant", "grew")])]
            )
        )
        await call.read()
        for watcher in watchers:
            got = await asyncio.wait_for(watcher.read(), 1)
            assert [e.sequence for e in got.events] == [2]
        # Woken by this process at once, and by the notifier's echo of the same event at most.
        assert reads - first_reads <= 2 * len(watchers)
        await call.done_writing()
        for watcher in watchers:
            watcher.cancel()
    finally:
        storage.events_after = events_after
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_a_watcher_hears_of_events_stored_through_another_server_process(
    database: str,
) -> None:
    one, two = await _serving(database), await _serving(database)
    stubs_one, stubs_two = Stubs(one.port), Stubs(two.port)
    try:
        collection = await stubs_one.set_up(runs=0)
        await _running_run(stubs_one, collection, "shared")
        watcher = stubs_two.ingest.WatchAgentRun(
            ingest_pb.WatchAgentRunRequest(agent_run_id="shared")
        )
        await watcher.read()
        call = stubs_one.ingest.StreamAgentRunEvents()
        sent = time.monotonic()
        await call.write(
            ingest_pb.StreamAgentRunEventsRequest(
                events=[_event("shared", 2, collection, [_message("assistant", "through one")])]
            )
        )
        await call.read()
        got = await asyncio.wait_for(watcher.read(), 2)
        assert [e.sequence for e in got.events] == [2]
        assert time.monotonic() - sent < 1
        watcher.cancel()
        await call.done_writing()
    finally:
        await stubs_one.channel.close()
        await stubs_two.channel.close()
        await one.shutdown(grace_seconds=1)
        await two.shutdown(grace_seconds=1)


# --- caps per API key, and a client turned away says why ------------------------------------------


async def test_one_key_cannot_hold_every_watch_stream(tmp_path: Any) -> None:
    server = await _serving(
        f"sqlite:///{tmp_path / 'a.db'}",
        auth="keys",
        limits=IngestionLimits(max_watch_streams_per_key=2, max_watch_streams=3),
    )
    admin = await _admin(server)
    stubs = Stubs(server.port)
    try:
        collection = (
            await stubs.ingest.CreateCollection(
                ingest_pb.CreateCollectionRequest(name="c"), metadata=_auth(admin)
            )
        ).collection.id
        await _running_run(stubs, collection, "watched", _auth(admin))
        greedy = await _admin(server, "greedy", scopes=["read"])
        other = await _admin(server, "other", scopes=["read"])

        def watch(token: str) -> Any:
            return stubs.ingest.WatchAgentRun(
                ingest_pb.WatchAgentRunRequest(agent_run_id="watched"), metadata=_auth(token)
            )

        held = [watch(greedy), watch(greedy)]
        for call in held:
            await call.read()
        code, details = await _ends(watch(greedy), 5)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "under API key 'greedy', at max_watch_streams_per_key=2" in details
        theirs = watch(other)
        await theirs.read()  # another key still gets one...
        code, details = await _ends(watch(other), 5)  # ...until the total is reached
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_watch_streams=3" in details
        for call in (*held, theirs):
            call.cancel()
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_a_writer_turned_away_says_why_in_its_summary(tmp_path: Any) -> None:
    server = await _serving(
        f"sqlite:///{tmp_path / 'a.db'}", limits=IngestionLimits(max_event_streams_per_peer=1)
    )
    stubs = Stubs(server.port)
    try:
        collection = await stubs.set_up(runs=0)
        holder = stubs.ingest.StreamAgentRunEvents()  # holds this host's one event stream
        await holder.write(
            ingest_pb.StreamAgentRunEventsRequest(
                events=[_event("held", 1, collection, [_message("user", "hi")])]
            )
        )
        await holder.read()
        writer = AgentRunWriter(
            collection, server_url=f"127.0.0.1:{server.port}", shutdown_timeout=2
        )
        writer.live_run(name="locked-out").append("main", [UserMessage(content="hello")])
        summary = await asyncio.to_thread(writer.finish)
        assert not summary.ok and summary.events_undelivered == 2
        assert any(
            "RESOURCE_EXHAUSTED" in e and "max_event_streams_per_peer=1" in e
            for e in summary.errors
        ), summary.errors
        holder.cancel()
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


# --- a key revoked or expired ends its streams ---------------------------------------------------


async def test_revoking_a_key_ends_every_stream_of_it_within_a_second(database: str) -> None:
    """Revoked through another server process on the same database: a watch, an upload waiting
    for its next message, an event stream and a Work stream of the key all end UNAUTHENTICATED."""
    server = await _serving(database, auth="keys")
    other = await _serving(database, auth="keys")
    admin = await _admin(server)
    await other._keys.reload()  # type: ignore[union-attr]
    stubs = Stubs(server.port)
    try:
        meta = _auth(admin)
        collection = await stubs.set_up(runs=0, metadata=meta)
        await _running_run(stubs, collection, "watched", meta)
        doomed = await _admin(server, "doomed", scopes=["ingest", "read", "work"])
        doomed_meta = _auth(doomed)
        watch = stubs.ingest.WatchAgentRun(
            ingest_pb.WatchAgentRunRequest(agent_run_id="watched"), metadata=doomed_meta
        )
        await watch.read()
        upload = stubs.ingest.UploadAgentRuns(metadata=doomed_meta)
        await upload.write(
            ingest_pb.UploadAgentRunsRequest(collection_id=collection, agent_runs=[_run_proto("u")])
        )
        events = stubs.ingest.StreamAgentRunEvents(metadata=doomed_meta)
        await events.write(
            ingest_pb.StreamAgentRunEventsRequest(
                events=[_event("e", 1, collection, [_message("user", "hi")])]
            )
        )
        await events.read()
        work = stubs.orch.Work(metadata=doomed_meta)
        await work.write(
            pb.WorkRequest(
                subscribe=pb.Subscribe(
                    workflow="wf", stages=[pb.StageSubscription(stage="work")], credits=1
                )
            )
        )
        await work.read()
        await asyncio.sleep(0.3)  # the upload waits for its next message
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as through_other:
            await key_grpc.KeyServiceStub(through_other).RevokeApiKey(
                key_pb.RevokeApiKeyRequest(name="doomed"), metadata=meta
            )
        revoked_at = time.monotonic()
        for call in (watch, upload, events, work):
            code, details = await (_code(call) if call is upload else _ends(call, 3))
            assert code is grpc.StatusCode.UNAUTHENTICATED, (call, code, details)
            assert "revoked" in details
        assert time.monotonic() - revoked_at < 1.5
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)
        await other.shutdown(grace_seconds=1)


async def test_an_expiring_key_is_refused_from_its_expiry_and_its_streams_end(
    tmp_path: Any,
) -> None:
    server = await _serving(f"sqlite:///{tmp_path / 'a.db'}", auth="keys")
    admin = await _admin(server)
    stubs = Stubs(server.port)
    try:
        meta = _auth(admin)
        collection = (
            await stubs.ingest.CreateCollection(
                ingest_pb.CreateCollectionRequest(name="c"), metadata=meta
            )
        ).collection.id
        await _running_run(stubs, collection, "watched", meta)
        expire = key_pb.ApiKey(name="brief", scopes=["read"])
        expire.expire_time.FromNanoseconds(int((time.time() + 1.5) * 1e9))
        made = await key_grpc.KeyServiceStub(stubs.channel).CreateApiKey(
            key_pb.CreateApiKeyRequest(key=expire), metadata=meta
        )
        assert made.key.expire_time.seconds == expire.expire_time.seconds
        brief = _auth(made.token)
        watch = stubs.ingest.WatchAgentRun(
            ingest_pb.WatchAgentRunRequest(agent_run_id="watched"), metadata=brief
        )
        await watch.read()
        code, details = await _ends(watch, 3)
        assert code is grpc.StatusCode.UNAUTHENTICATED and "expired" in details
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.ingest.ListCollections(ingest_pb.ListCollectionsRequest(), metadata=brief)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "expired at" in (refused.value.details() or "")
        past = key_pb.ApiKey(name="stillborn", scopes=["read"])
        past.expire_time.FromNanoseconds(int((time.time() - 60) * 1e9))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await key_grpc.KeyServiceStub(stubs.channel).CreateApiKey(
                key_pb.CreateApiKeyRequest(key=past), metadata=meta
            )
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "expire_time" in (invalid.value.details() or "")
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)
