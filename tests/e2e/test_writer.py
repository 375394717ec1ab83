"""The writer against real servers: killed servers, killed writers, RetryInfo, limits, exit.

Every run is counted in the SQLite file itself: the server's word is not taken for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    InvalidRunError,
    RejectedRun,
    Transcript,
    WriterClosedError,
    agent_run_to_proto,
    load_agent_runs,
)
from agentrun._retry import Backoff, retry_delay_seconds
from agentrun.chat import UserMessage
from agentrun.v1 import agent_run_pb2
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.v1 import ingestion_service_pb2_grpc as pb_grpc
from agentrun.wire.framing import RawUpload, decode_upload_request
from agentrun_server import IngestionLimits, Server, ServerConfig
from agentrun_server.serving._status import retry_info_trailer

from ..fakes import serve_fake
from ..processes import ServerProcess, free_port

FAST_BACKOFF = Backoff(initial_seconds=0.05, max_seconds=0.5)


def copies(path: Path, times: int) -> list[agent_run_pb2.AgentRun]:
    """The real runs of `path`, `times` over, each copy under its own id (wire form)."""
    protos = [agent_run_to_proto(run) for run in load_agent_runs(path)]
    out = []
    for k in range(times):
        for proto in protos:
            copy = agent_run_pb2.AgentRun()
            copy.CopyFrom(proto)
            copy.id = f"{proto.id}-copy-{k}"
            out.append(copy)
    return out


def stored_ids(db: str) -> list[str]:
    """Every run id in the database (a URL), one entry per stored row."""
    if db.startswith("sqlite:///"):
        with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
            return [row[0] for row in conn.execute("SELECT id FROM agent_runs")]
    import psycopg

    with psycopg.connect(db) as pg:
        return [row[0] for row in pg.execute("SELECT id FROM agent_runs").fetchall()]


def make_run(run_id: str, text: str = "hello") -> AgentRun:
    return AgentRun(
        id=run_id,
        transcripts={"t": Transcript(messages=[UserMessage(content=text)])},
        metadata=BaseAgentRunMetadata(scores={"reward": 1.0}),
    )


def create_collections(url: str, *names: str) -> list[str]:
    """Create collections by name (blocking: from async tests, call it in a thread)."""
    with Client(url) as client:
        return [client.create_collection(name).collection.id for name in names]


def wait_until(condition: object, timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_server_stopped_mid_upload_loses_nothing_and_stores_nothing_twice(
    database: str, tau_bench_path: Path, stop: str
) -> None:
    runs = copies(tau_bench_path, 15)  # 3,000 real runs, about 48 MB
    db = database
    with ServerProcess(db) as server:
        with Client(server.url) as client:
            collection = client.create_collection("c").collection.id
        writer = AgentRunWriter(
            collection,
            server_url=server.url,
            batch_size=50,
            flush_interval=0.05,
            backoff=FAST_BACKOFF,
        )
        writer.log_agent_runs(runs)
        wait_until(lambda: len(stored_ids(db)) >= 100)
        if stop == "SIGKILL":
            server.kill()
        else:
            assert server.terminate() == 0  # graceful: in-flight commits are acknowledged
        stored_at_stop = len(stored_ids(db))
        server.start()
        summary = writer.finish()
    assert stored_at_stop < len(runs), "the server stopped after the upload, not during it"
    assert summary.ok, summary
    assert summary.accepted + summary.duplicates == len(runs)
    ids = stored_ids(db)
    assert len(ids) == len(set(ids)) == len(runs)
    assert set(ids) == {run.id for run in runs}


CHILD_WRITER = textwrap.dedent(
    """
    import sys
    from agentrun import AgentRunWriter
    sys.path.insert(0, {root!r})
    from tests.e2e.test_writer import copies
    runs = copies({path!r}, 10)
    writer = AgentRunWriter({collection!r}, server_url={url!r}, spool_dir={spool!r}, batch_size=50,
                            flush_interval=0.05)
    for i in range(0, len(runs), 50):
        writer.log_agent_runs(runs[i : i + 50])
        print(i + 50, flush=True)
    writer.finish()
    """
)


def test_a_writer_killed_mid_upload_leaves_every_accepted_run_in_its_spool(
    tmp_path: Path, tau_bench_path: Path
) -> None:
    db, spool = f"sqlite:///{tmp_path / 'agentrun.db'}", tmp_path / "spool"
    expected = [run.id for run in copies(tau_bench_path, 10)]
    with ServerProcess(db) as server:
        with Client(server.url) as client:
            collection = client.create_collection("c").collection.id
        script = CHILD_WRITER.format(
            root=str(Path(__file__).parents[2]),
            path=str(tau_bench_path),
            collection=collection,
            url=server.url,
            spool=str(spool),
        )
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        logged = 0
        for line in child.stdout:  # kill it halfway through its logging
            logged = int(line)
            if logged >= len(expected) // 2:
                child.send_signal(signal.SIGKILL)
                break
        child.wait(timeout=10)
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        stored_at_kill = set(stored_ids(db))
        assert len(stored_at_kill) < logged, "nothing was left to replay"

        with AgentRunWriter(collection, server_url=server.url, spool_dir=spool) as writer:
            pass
        summary = writer.finish()
    assert summary.ok, summary
    assert summary.replayed >= logged - len(stored_at_kill)
    ids = stored_ids(db)
    assert len(ids) == len(set(ids))  # nothing stored twice
    assert set(expected[:logged]) <= set(ids) <= set(expected)  # all accepted, nothing invented
    assert not list(spool.glob("*.seg"))  # every segment acknowledged and removed


class FlakyIngestion:
    """A real gRPC server whose first `failures` uploads fail with `code` (and RetryInfo)."""

    def __init__(self, failures: int, code: grpc.StatusCode, retry_after: float | None) -> None:
        self.failures = failures
        self.code = code
        self.retry_after = retry_after
        self.calls: list[float] = []

    async def upload(
        self, requests: AsyncIterator[RawUpload], context: grpc.aio.ServicerContext
    ) -> pb.UploadAgentRunsResponse:
        runs = sum([len(request.runs) async for request in requests])
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            trailer = (
                retry_info_trailer(self.code, "busy", self.retry_after)
                if self.retry_after is not None
                else ()
            )
            await context.abort(self.code, "busy", trailer)
        return pb.UploadAgentRunsResponse(accepted_count=runs)

    async def serve(self) -> grpc.aio.Server:
        handler = grpc.stream_unary_rpc_method_handler(
            self.upload,
            request_deserializer=decode_upload_request,
            response_serializer=pb.UploadAgentRunsResponse.SerializeToString,
        )
        server, self.port = await serve_fake(
            "agentrun.v1.IngestionService", {"UploadAgentRuns": handler}
        )
        return server


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_the_writer_waits_as_long_as_retry_info_says(code: grpc.StatusCode) -> None:
    flaky = FlakyIngestion(failures=2, code=code, retry_after=0.4)
    server = await flaky.serve()
    try:
        writer = AgentRunWriter(
            "c",
            server_url=f"127.0.0.1:{flaky.port}",
            backoff=Backoff(initial_seconds=0.01, max_seconds=0.01),
        )
        writer.log_agent_runs([make_run(f"r{i}") for i in range(10)])
        summary = await asyncio.to_thread(writer.finish)
    finally:
        await server.stop(0)
    assert summary.ok and summary.accepted == 10
    assert len(flaky.calls) == 3
    gaps = [later - earlier for earlier, later in zip(flaky.calls, flaky.calls[1:], strict=False)]
    assert all(gap >= 0.4 for gap in gaps), gaps  # not the 0.01 s its own backoff would wait


async def test_resource_exhausted_without_retry_info_is_not_retried() -> None:
    flaky = FlakyIngestion(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=None)
    server = await flaky.serve()
    try:
        writer = AgentRunWriter("c", server_url=f"127.0.0.1:{flaky.port}", backoff=FAST_BACKOFF)
        writer.log_agent_runs([make_run("r")])
        summary = await asyncio.to_thread(writer.finish)
    finally:
        await server.stop(0)
    assert len(flaky.calls) == 1
    assert summary.undelivered == 1
    assert "RESOURCE_EXHAUSTED: busy" in summary.errors


@pytest.fixture
async def small_server(tmp_path: Path) -> AsyncIterator[Server]:
    """Both services with small limits: runs over 4 kB, messages over 64 kB, one upload stream."""
    limits = IngestionLimits(max_run_bytes=4096, max_message_bytes=64 * 1024, max_upload_streams=1)
    s = Server(
        ServerConfig(
            db=f"sqlite:///{tmp_path / 'agentrun.db'}",
            port=0,
            metrics_port=-1,
            web_port=-1,
            limits=limits,
        )
    )
    await s.start()
    yield s
    await s.shutdown(grace_seconds=1)


async def test_a_mixed_batch_lands_its_good_runs_and_names_every_other_one(
    small_server: Server,
) -> None:
    url = f"127.0.0.1:{small_server.port}"
    collection, other = await asyncio.to_thread(create_collections, url, "c", "other")
    for target, run_id in ((collection, "stored-before"), (other, "elsewhere")):
        writer = AgentRunWriter(target, server_url=url)
        writer.log_agent_runs([make_run(run_id)])
        await asyncio.to_thread(writer.finish)
    invalid = agent_run_to_proto(make_run("invalid"))
    del invalid.transcripts[:]
    batch: list[AgentRun | agent_run_pb2.AgentRun] = [
        make_run("good-0"),
        make_run("oversize", "x" * 5000),
        make_run("good-1"),
        make_run("stored-before"),
        make_run("good-0"),  # repeated within the batch
        make_run("elsewhere"),
        make_run("good-2"),
    ]
    rejected: list[RejectedRun] = []
    writer = AgentRunWriter(collection, server_url=url, on_rejected=rejected.append)
    # A run the server would refuse as invalid fails here, in the caller, on the server's checks.
    with pytest.raises(InvalidRunError, match="'invalid': transcripts: an agent run must have"):
        writer.log_agent_runs([invalid])
    writer.log_agent_runs(batch)
    summary = await asyncio.to_thread(writer.finish)
    assert (summary.accepted, summary.duplicates) == (3, 2)
    assert {(r.agent_run_id, r.reason) for r in summary.rejected} == {
        ("oversize", "TOO_LARGE"),
        ("elsewhere", "CONFLICT"),
    }
    assert rejected == summary.rejected
    by_id = {r.agent_run_id: r.message for r in rejected}
    assert "max_run_bytes=4096" in by_id["oversize"]

    # On the wire, each rejection carries its index in the stream.
    async with grpc.aio.insecure_channel(url) as channel:
        response = await pb_grpc.IngestionServiceStub(channel).UploadAgentRuns(
            iter(
                [
                    pb.UploadAgentRunsRequest(
                        collection_id=collection,
                        agent_runs=[
                            r if isinstance(r, agent_run_pb2.AgentRun) else agent_run_to_proto(r)
                            for r in [*batch[:2], invalid, *batch[2:]]
                        ],
                    )
                ]
            )
        )
    assert [(r.index, r.reason) for r in response.rejected] == [
        (1, pb.REJECTION_REASON_TOO_LARGE),
        (2, pb.REJECTION_REASON_INVALID),
        (6, pb.REJECTION_REASON_CONFLICT),
    ]


async def test_a_batch_over_the_message_limit_is_split_and_a_lone_giant_rejected(
    small_server: Server,
) -> None:
    url = f"127.0.0.1:{small_server.port}"
    (collection,) = await asyncio.to_thread(create_collections, url, "c")
    runs = [make_run(f"r{i}", "y" * 3000) for i in range(40)]  # ~120 kB: twice the 64 kB limit
    giant = make_run("giant", "z" * 100_000)  # over the message limit on its own
    writer = AgentRunWriter(collection, server_url=url, max_batch_bytes=10**7, flush_interval=0.2)
    writer.log_agent_runs([*runs, giant])
    summary = await asyncio.to_thread(writer.finish)
    assert summary.accepted == 40
    ((rejected),) = summary.rejected
    assert (rejected.agent_run_id, rejected.reason) == ("giant", "TOO_LARGE")
    assert "larger than max" in rejected.message


async def test_gzip_uploads_land(server: Server) -> None:
    url = f"127.0.0.1:{server.port}"
    (collection,) = await asyncio.to_thread(create_collections, url, "c")
    writer = AgentRunWriter(collection, server_url=url, compression="gzip")
    writer.log_agent_runs([make_run(f"r{i}", "compressible " * 500) for i in range(20)])
    summary = await asyncio.to_thread(writer.finish)
    assert summary.ok and summary.accepted == 20


@pytest.mark.parametrize("batch_size", [10, 200])
async def test_one_call_logging_more_runs_than_the_queue_holds_streams_through_it(
    server: Server, batch_size: int
) -> None:
    # A single call that overfills the queue once deadlocked: the caller waited for room that
    # upload workers, never told of the runs it had added, would not make.
    url = f"127.0.0.1:{server.port}"
    (collection,) = await asyncio.to_thread(create_collections, url, "c")
    writer = AgentRunWriter(
        collection, server_url=url, queue_maxsize=50, batch_size=batch_size, flush_interval=0.01
    )
    runs = (make_run(f"r{i}") for i in range(1_000))  # a generator: consumed in chunks
    try:
        await asyncio.wait_for(asyncio.to_thread(writer.log_agent_runs, runs), 30)
    except TimeoutError:
        writer.finish(force=True)  # lets the stuck caller go, so the test fails rather than hangs
        raise
    summary = await asyncio.to_thread(writer.finish)
    assert summary.ok and summary.accepted == 1_000


def test_finish_from_another_thread_accounts_for_a_caller_waiting_for_room() -> None:
    # As from a signal handler while the main thread logs into a full queue: every run is either
    # in the summary or named in the caller's error, none silently dropped.
    writer = AgentRunWriter(
        "c",
        server_url=f"127.0.0.1:{free_port()}",  # nothing listens: the queue fills and stays full
        num_workers=1,
        queue_maxsize=10,
        batch_size=5,
        flush_interval=0.01,
        backoff=FAST_BACKOFF,
    )
    errors: list[BaseException] = []

    def log() -> None:
        try:
            writer.log_agent_runs([make_run(f"r{i}") for i in range(100)])
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=log)
    producer.start()
    time.sleep(0.5)
    assert producer.is_alive()  # waiting for room
    summary = writer.finish(force=True)
    producer.join(timeout=10)
    assert not producer.is_alive()
    (error,) = errors
    assert isinstance(error, WriterClosedError)
    queued = re.search(r"the first (\d+) runs of this call were queued", str(error))
    assert queued is not None, error
    assert summary.accepted == 0 and 0 < summary.undelivered < 100
    assert summary.undelivered == int(queued.group(1))  # counted in the summary, or named here


async def test_an_upload_stream_over_the_limit_is_told_when_to_retry(small_server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        collection = (await stub.CreateCollection(pb.CreateCollectionRequest(name="c"))).collection
        request = pb.UploadAgentRunsRequest(
            collection_id=collection.id, agent_runs=[agent_run_to_proto(make_run("a"))]
        )
        first = stub.UploadAgentRuns()
        await first.write(request)  # holds the one stream allowed
        await asyncio.sleep(0.2)
        second = stub.UploadAgentRuns(iter([request]))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await second
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_upload_streams=1" in (error.value.details() or "")
        assert retry_delay_seconds(error.value) == small_server.config.limits.retry_after_seconds
        await first.done_writing()
        assert (await first).accepted_count == 1


async def test_draining_turns_health_not_serving_and_finishes_open_uploads(
    server: Server,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        collection = (await stub.CreateCollection(pb.CreateCollectionRequest(name="c"))).collection
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        upload = stub.UploadAgentRuns()
        await upload.write(
            pb.UploadAgentRunsRequest(
                collection_id=collection.id, agent_runs=[agent_run_to_proto(make_run("a"))]
            )
        )
        # The upload is being served (its first message stored) before the shutdown begins: a
        # call the server has not taken up yet when it stops is cancelled by gRPC itself.
        for _ in range(200):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.GetAgentRun(pb.GetAgentRunRequest(agent_run_id="a"))
                break
            await asyncio.sleep(0.05)
        shutdown = asyncio.create_task(server.shutdown(grace_seconds=5))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # The open upload still finishes, and is acknowledged, during the grace period.
        await upload.write(
            pb.UploadAgentRunsRequest(
                collection_id=collection.id, agent_runs=[agent_run_to_proto(make_run("b"))]
            )
        )
        await upload.done_writing()
        assert (await upload).accepted_count == 2
        await shutdown


def test_finish_against_a_dead_server_returns_in_time_and_keeps_the_spool(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    writer = AgentRunWriter(
        "c", server_url=f"127.0.0.1:{port}", shutdown_timeout=1, spool_dir=tmp_path / "spool"
    )
    writer.log_agent_runs([make_run(f"r{i}") for i in range(20)])
    started = time.monotonic()
    summary = writer.finish()
    assert time.monotonic() - started < 3
    assert (summary.undelivered, summary.spooled, summary.accepted) == (20, 20, 0)
    assert summary.errors

    # A server comes up on that port: the next writer on the spool delivers all 20.
    with ServerProcess(tmp_path / "agentrun.db", port) as server:
        with Client(server.url) as client:
            client.create_collection("c")
        db = sqlite3.connect(tmp_path / "agentrun.db")
        db.execute("UPDATE collections SET id = 'c'")  # the id the runs were spooled for
        db.commit()
        db.close()
        with AgentRunWriter("c", server_url=server.url, spool_dir=tmp_path / "spool") as writer:
            pass
        assert writer.finish().replayed == 20
    assert sorted(stored_ids(f"sqlite:///{tmp_path / 'agentrun.db'}")) == sorted(
        f"r{i}" for i in range(20)
    )


FORGETFUL_SCRIPT = textwrap.dedent(
    """
    import threading
    from agentrun import AgentRun, AgentRunWriter, BaseAgentRunMetadata, Transcript
    from agentrun.chat import UserMessage

    def main():  # off the main thread: no signal handlers to install, nothing to break
        writer = AgentRunWriter({collection!r}, server_url={url!r}, shutdown_timeout={timeout})
        writer.log_agent_runs(
            AgentRun(
                id=f"run-{{i}}",
                transcripts={{"t": Transcript(messages=[UserMessage(content="hi")])}},
                metadata=BaseAgentRunMetadata(scores={{}}),
            )
            for i in range(100)
        )  # and never finish()

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    """
)


@pytest.mark.parametrize("alive", [True, False])
def test_a_script_that_forgets_finish_still_exits(tmp_path: Path, alive: bool) -> None:
    db = f"sqlite:///{tmp_path / 'agentrun.db'}"
    with ServerProcess(db) as server:
        with Client(server.url) as client:
            collection = client.create_collection("c").collection.id
        url = server.url if alive else f"127.0.0.1:{free_port()}"
        script = FORGETFUL_SCRIPT.format(collection=collection, url=url, timeout=2)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "finish() was not called" in result.stderr
    if alive:
        assert len(stored_ids(db)) == 100  # flushed at exit
    else:
        assert "100 undelivered" in result.stderr
        assert elapsed < 2 + 10  # the shutdown_timeout, plus interpreter start-up
