"""Bad input gets a clear answer, and nothing a client sends or stored can break a read or the
service for others: one test per case found by trying the service as a careless client would.

Servers run in this process on real sockets; clients are raw stubs, so that they can send what the
SDK never would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from agentrun._convert import agent_run_to_proto
from agentrun._retry import retry_delay_seconds
from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingest_grpc
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc
from agentrun.v1 import workflow_pb2 as wf_pb
from agentrun_server import ConnectionLimits, IngestionLimits, Server, ServerConfig
from agentrun_server.orchestrator import WorkLimits
from agentrun_server.storage import Failure, StageDef, WorkflowDef, open_storage

from .test_fuzz import _run

INVALID, NOT_FOUND, STALE = 3, 5, 9  # Ack codes, as gRPC status numbers
BIG = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class Stubs:
    """Raw stubs to one server."""

    def __init__(self, port: int, options: list[tuple[str, Any]] | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", BIG if options is None else options
        )
        self.ingest = ingest_grpc.IngestionServiceStub(self.channel)
        self.orch = pb_grpc.OrchestratorServiceStub(self.channel)

    async def set_up(
        self, runs: int = 3, stages: list[wf_pb.Stage] | None = None, metadata: Any = ()
    ) -> str:
        """The workflow "wf" (stage "work", or `stages`), a collection bound to it, `runs` runs;
        `metadata` goes with each call (an admin key's, on a server with keys)."""
        await self.orch.ApplyWorkflow(
            pb.ApplyWorkflowRequest(
                workflow=wf_pb.Workflow(name="wf", stages=stages or [wf_pb.Stage(name="work")])
            ),
            metadata=metadata,
        )
        collection = (
            await self.ingest.CreateCollection(
                ingest_pb.CreateCollectionRequest(name="c", workflow="wf"), metadata=metadata
            )
        ).collection.id
        if runs:
            await self.upload(collection, [agent_run_to_proto(_run(i)) for i in range(runs)])
        return collection

    async def upload(
        self, collection: str, runs: list[run_pb.AgentRun]
    ) -> ingest_pb.UploadAgentRunsResponse:
        async def requests() -> AsyncIterator[ingest_pb.UploadAgentRunsRequest]:
            yield ingest_pb.UploadAgentRunsRequest(collection_id=collection, agent_runs=runs)

        return await self.ingest.UploadAgentRuns(requests())


class Worker:
    """A Work stream driven by hand. One task reads it (cancelling a read cancels the call), so
    that waiting for a response that never comes leaves the stream open."""

    def __init__(self, stubs: Stubs, metadata: Any = ()) -> None:
        self.call = stubs.orch.Work(metadata=metadata)
        self.responses: asyncio.Queue[pb.WorkResponse | BaseException | None] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.responses.put_nowait(response)
            self.responses.put_nowait(None)
        except grpc.aio.AioRpcError as exc:
            self.responses.put_nowait(exc)

    async def subscribe(self, credits: int = 10, **fields: Any) -> pb.Subscribed:
        await self.call.write(
            pb.WorkRequest(
                subscribe=pb.Subscribe(
                    workflow="wf",
                    stages=[pb.StageSubscription(stage="work")],
                    credits=credits,
                    **fields,
                )
            )
        )
        return await self.next("subscribed")

    async def next(self, kind: str, timeout_seconds: float = 10) -> Any:
        while True:
            response = await asyncio.wait_for(self.responses.get(), timeout_seconds)
            if isinstance(response, BaseException):
                raise response
            assert response is not None, "the stream ended"
            if response.WhichOneof("kind") == kind:
                return getattr(response, kind)

    async def leases(self, count: int) -> list[pb.Lease]:
        got: list[pb.Lease] = []
        while len(got) < count:
            got.extend((await self.next("leases")).leases)
        return got

    async def send(self, **request: Any) -> list[pb.Ack]:
        await self.call.write(pb.WorkRequest(**request))
        return list((await self.next("acks")).acks)


async def _start(tmp_path: Any, **config: Any) -> Server:
    """Both services on a SQLite file in `tmp_path` and a free port, with `config`'s settings."""
    server = Server(
        ServerConfig(
            db=f"sqlite:///{tmp_path / 'a.db'}", port=0, metrics_port=-1, web_port=-1, **config
        )
    )
    await server.start()
    return server


@pytest.fixture
async def sqlite_server(tmp_path: Any) -> AsyncIterator[Server]:
    server = await _start(tmp_path)
    yield server
    await server.shutdown(grace_seconds=1)


@pytest.fixture
async def stubs(sqlite_server: Server) -> AsyncIterator[Stubs]:
    s = Stubs(sqlite_server.port)
    yield s
    await s.channel.close()


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# --- wrong or vague codes ------------------------------------------------------------------------


async def test_a_request_that_does_not_decode_is_invalid_argument(stubs: Stubs) -> None:
    raw = stubs.channel.unary_unary("/agentrun.v1.OrchestratorService/GetTask")
    code, details = await _code(raw(b"\x0a\xff\xff\xff\xff\x0f"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in details and "GetTaskRequest" in details


async def test_a_work_message_that_does_not_decode_ends_that_stream_only_and_its_lease_resumes(
    stubs: Stubs,
) -> None:
    await stubs.set_up(runs=1)
    raw = stubs.channel.stream_stream("/agentrun.v1.OrchestratorService/Work")()
    subscribe = pb.WorkRequest(
        subscribe=pb.Subscribe(
            workflow="wf", stages=[pb.StageSubscription(stage="work")], credits=1
        )
    )
    await raw.write(subscribe.SerializeToString())
    lease = None
    while lease is None:
        response = pb.WorkResponse.FromString(await raw.read())
        if response.leases.leases:
            lease = response.leases.leases[0]
    await raw.write(b"\x1a\x05\x0a\x03\xff\xfe\xfd")  # complete_tasks with bad UTF-8
    with pytest.raises(grpc.aio.AioRpcError):
        while await raw.read() is not grpc.aio.EOF:
            pass
    assert await raw.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in (await raw.details() or "")

    worker = Worker(stubs)  # the lease was detached, not ended: no attempt spent
    subscribed = await worker.subscribe(
        resume=[pb.LeaseRef(task_id=lease.task_id, lease_id=lease.lease_id)]
    )
    assert [a.code for a in subscribed.resumed] == [0]
    acks = await worker.send(
        complete_tasks=pb.CompleteTasks(
            completions=[pb.TaskCompletion(task_id=lease.task_id, lease_id=lease.lease_id)]
        )
    )
    assert [a.code for a in acks] == [0]
    task = (await stubs.orch.GetTask(pb.GetTaskRequest(task_id=lease.task_id))).task
    assert task.state == wf_pb.TASK_STATE_DONE and task.attempt == 1 and not task.failures


async def test_an_overflowing_task_id_is_answered_per_item_and_the_stream_lives_on(
    stubs: Stubs,
) -> None:
    await stubs.set_up(runs=1)
    worker = Worker(stubs)
    await worker.subscribe(credits=1)
    (lease,) = await worker.leases(1)
    acks = await worker.send(
        complete_tasks=pb.CompleteTasks(
            completions=[
                pb.TaskCompletion(task_id="99999999999999999999999", lease_id=lease.lease_id),
                pb.TaskCompletion(task_id="-3", lease_id=lease.lease_id),
                pb.TaskCompletion(task_id=lease.task_id, lease_id=lease.lease_id),
            ]
        )
    )
    assert [a.code for a in acks] == [NOT_FOUND, NOT_FOUND, 0]
    task = (await stubs.orch.GetTask(pb.GetTaskRequest(task_id=lease.task_id))).task
    assert task.state == wf_pb.TASK_STATE_DONE and not task.failures


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("GetTask", pb.GetTaskRequest(task_id="99999999999999999999")),
        ("GetTask", pb.GetTaskRequest(task_id="1e3")),
        ("ListTasks", pb.ListTasksRequest(page_token="99999999999999999999")),
        ("ListTasks", pb.ListTasksRequest(state=99)),
        ("CancelTasks", pb.CancelTasksRequest(task_ids=["1", "18446744073709551616"])),
        ("RedriveTasks", pb.RedriveTasksRequest(task_ids=["x"])),
    ],
)
async def test_ids_page_tokens_and_enums_out_of_range_are_invalid_argument(
    stubs: Stubs, method: str, message: Any
) -> None:
    code, details = await _code(getattr(stubs.orch, method)(message))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.split(":")[0] in ("task_id", "page_token", "state", "task_ids[1]", "task_ids[0]")


async def test_list_agent_runs_refuses_a_page_token_or_view_out_of_range(stubs: Stubs) -> None:
    collection = await stubs.set_up(runs=1)
    for request in (
        ingest_pb.ListAgentRunsRequest(collection_id=collection, page_token="-1"),
        ingest_pb.ListAgentRunsRequest(collection_id=collection, view=7),
    ):
        code, _ = await _code(stubs.ingest.ListAgentRuns(request))
        assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_late_fail_of_an_expired_lease_is_stale_like_every_other_settle(
    stubs: Stubs,
) -> None:
    await stubs.set_up(runs=1)
    worker = Worker(stubs)
    subscribed = await worker.subscribe(credits=1, lease_duration=_duration(0.3))
    assert subscribed.session_id
    (lease,) = await worker.leases(1)
    revoked = await worker.next("revoked")  # the sweep ends it within about a second
    assert revoked.leases[0].lease_id == lease.lease_id
    ref = {"task_id": lease.task_id, "lease_id": lease.lease_id}
    codes = [
        (
            await worker.send(
                fail_tasks=pb.FailTasks(failures=[pb.TaskFailure(**ref, error="late")])
            )
        )[0].code,
        (
            await worker.send(
                complete_tasks=pb.CompleteTasks(completions=[pb.TaskCompletion(**ref)])
            )
        )[0].code,
        (await worker.send(release_tasks=pb.ReleaseTasks(releases=[pb.TaskRelease(**ref)])))[
            0
        ].code,
        (await worker.send(extend_leases=pb.ExtendLeases(extensions=[pb.LeaseExtension(**ref)])))[
            0
        ].code,
    ]
    assert codes == [STALE] * 4


def _duration(seconds: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


async def test_extend_with_a_negative_or_endless_duration_is_refused_and_the_lease_kept(
    stubs: Stubs,
) -> None:
    await stubs.set_up(runs=1)
    worker = Worker(stubs)
    await worker.subscribe(credits=1)
    (lease,) = await worker.leases(1)
    ref = {"task_id": lease.task_id, "lease_id": lease.lease_id}
    for seconds in (-5, 0, 10**12):
        duration = _duration(0)
        duration.seconds = seconds
        (ack,) = await worker.send(
            extend_leases=pb.ExtendLeases(
                extensions=[pb.LeaseExtension(**ref, lease_duration=duration)]
            )
        )
        assert ack.code == INVALID and "lease_duration" in ack.message, ack.message
    (ack,) = await worker.send(
        complete_tasks=pb.CompleteTasks(completions=[pb.TaskCompletion(**ref)])
    )
    assert ack.code == 0


async def test_error_messages_cut_echoed_input_short(stubs: Stubs) -> None:
    huge = "x" * 10_000_000
    for call in (
        stubs.ingest.GetAgentRun(ingest_pb.GetAgentRunRequest(agent_run_id=huge)),
        stubs.ingest.GetCollection(ingest_pb.GetCollectionRequest(name=huge)),
        stubs.orch.GetTask(pb.GetTaskRequest(task_id=huge)),
        stubs.orch.GetWorkflow(pb.GetWorkflowRequest(name=huge)),
        stubs.orch.ListTasks(pb.ListTasksRequest(page_token=huge)),
    ):
        code, details = await _code(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert len(details) < 300, details[:300]


# --- one stored value breaks reads for everyone ---------------------------------------------------


async def test_a_huge_retry_after_is_refused_and_a_stored_one_never_breaks_reads(
    server: Server, database: str
) -> None:
    stubs = Stubs(server.port)
    await stubs.set_up(runs=2)
    worker = Worker(stubs)
    await worker.subscribe(credits=2)
    first, second = await worker.leases(2)
    ref = {"task_id": first.task_id, "lease_id": first.lease_id}
    for seconds, says in [(10**12, "not a valid google.protobuf.Duration"), (10**9, "604800")]:
        huge = _duration(0)
        huge.seconds = seconds
        (ack,) = await worker.send(
            fail_tasks=pb.FailTasks(failures=[pb.TaskFailure(**ref, error="e", retry_after=huge)])
        )
        assert ack.code == INVALID and "failures[0].retry_after" in ack.message
        assert says in ack.message, ack.message

    # A value stored before the check (here written past it) still reads back.
    storage = await open_storage(database)
    try:
        await storage.fail(
            [Failure(int(second.task_id), second.lease_id, "e", False, 1e12)], time.time()
        )
    finally:
        await storage.close()
    task = (await stubs.orch.GetTask(pb.GetTaskRequest(task_id=second.task_id))).task
    assert task.state == wf_pb.TASK_STATE_READY
    assert task.ready_time.seconds > time.time() + 1e9
    await stubs.orch.CancelTasks(pb.CancelTasksRequest(task_ids=[second.task_id]))
    listed = (await stubs.orch.ListTasks(pb.ListTasksRequest())).tasks
    assert len(listed) == 2
    await stubs.channel.close()


async def test_a_stage_lease_duration_out_of_range_is_refused_and_a_stored_one_reads(
    server: Server, database: str
) -> None:
    stubs = Stubs(server.port)
    endless = _duration(0)
    endless.seconds = 2**63 - 1
    code, details = await _code(
        stubs.orch.ApplyWorkflow(
            pb.ApplyWorkflowRequest(
                workflow=wf_pb.Workflow(
                    name="wf", stages=[wf_pb.Stage(name="work", lease_duration=endless)]
                )
            )
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "lease_duration" in details, details

    storage = await open_storage(database)
    try:
        await storage.put_workflow(
            WorkflowDef(
                "old", (StageDef("work", lease_seconds=9.2e18, max_backoff_seconds=1e300),)
            ),
            time.time(),
        )
    finally:
        await storage.close()
    got = (await stubs.orch.GetWorkflow(pb.GetWorkflowRequest(name="old"))).workflow
    assert got.stages[0].lease_duration.seconds == 315_576_000_000
    assert len((await stubs.orch.ListWorkflows(pb.ListWorkflowsRequest())).workflows) == 1
    await stubs.channel.close()


async def test_a_huge_description_is_refused_and_a_stored_one_never_breaks_listing(
    server: Server, database: str
) -> None:
    stubs = Stubs(server.port)
    code, details = await _code(
        stubs.ingest.CreateCollection(
            ingest_pb.CreateCollectionRequest(name="c", description="d" * (64 * 1024 + 1))
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "description" in details
    assert "65,536" in details

    storage = await open_storage(database)
    try:
        await storage.create_collection("old", "d" * 40_000_000, "", time.time())
    finally:
        await storage.close()
    (collection,) = (
        await stubs.ingest.ListCollections(ingest_pb.ListCollectionsRequest())
    ).collections
    assert isinstance(collection, ingest_pb.Collection) and len(collection.description) == 64 * 1024
    await stubs.channel.close()


async def test_scores_as_a_metadata_field_are_refused_and_the_rest_of_the_batch_lands(
    stubs: Stubs,
) -> None:
    collection = await stubs.set_up(runs=0)
    bad = agent_run_to_proto(_run(1))
    bad.metadata.fields["scores"].value.string_value = "high"
    response = await stubs.upload(collection, [bad, agent_run_to_proto(_run(2))])
    assert response.accepted_count == 1
    (rejected,) = response.rejected
    assert rejected.index == 0 and rejected.field == "metadata.fields['scores']"


async def test_a_run_nested_deeper_than_the_model_allows_is_refused_naming_the_field(
    stubs: Stubs,
) -> None:
    collection = await stubs.set_up(runs=0)
    deep = agent_run_to_proto(_run(1))
    value = deep.metadata.fields["tree"].value
    for _ in range(21):
        value = value.list_value.values.add()
    value.int_value = 1
    ok = agent_run_to_proto(_run(2))
    value = ok.metadata.fields["tree"].value
    for _ in range(20):
        value = value.list_value.values.add()
    value.int_value = 1
    response = await stubs.upload(collection, [deep, ok])
    assert response.accepted_count == 1
    (rejected,) = response.rejected
    assert rejected.field == "metadata.fields['tree']" and "20 levels" in rejected.message


# --- a greedy worker ------------------------------------------------------------------------------


async def test_a_greedy_worker_cannot_take_the_backlog(tmp_path: Any) -> None:
    limits = WorkLimits(max_credits=5)
    server = await _start(tmp_path, work_limits=limits)
    stubs = Stubs(server.port)
    try:
        await stubs.set_up(runs=20)
        greedy = Worker(stubs)
        await greedy.call.write(
            pb.WorkRequest(
                subscribe=pb.Subscribe(
                    workflow="wf", stages=[pb.StageSubscription(stage="work")], credits=2**32 - 1
                )
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await greedy.next("subscribed")
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "credits" in (refused.value.details() or "")

        granting = Worker(stubs)
        await granting.subscribe(credits=1)
        await granting.call.write(pb.WorkRequest(grant_credits=pb.GrantCredits(credits=2**32 - 1)))
        await granting.leases(5)
        with pytest.raises(TimeoutError):  # no sixth lease: grants are cut to max_credits
            await granting.next("leases", timeout_seconds=1.0)
        other = Worker(stubs)
        await other.subscribe(credits=5)
        assert len(await other.leases(5)) == 5
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_a_stream_holds_at_most_max_leased_bytes(tmp_path: Any) -> None:
    run_bytes = len(agent_run_to_proto(_run(1)).SerializeToString())
    limits = WorkLimits(max_leased_bytes=run_bytes * 3)
    server = await _start(tmp_path, work_limits=limits)
    stubs = Stubs(server.port)
    try:
        await stubs.set_up(runs=10)
        worker = Worker(stubs)
        await worker.subscribe(credits=100)
        held = await worker.leases(3)
        with pytest.raises(TimeoutError):
            await worker.next("leases", timeout_seconds=1.0)
        await worker.send(
            complete_tasks=pb.CompleteTasks(
                completions=[pb.TaskCompletion(task_id=held[0].task_id, lease_id=held[0].lease_id)]
            )
        )
        assert len(await worker.leases(1)) == 1  # settling makes room again
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_lease_batches_fit_a_client_built_with_grpc_defaults(
    sqlite_server: Server,
) -> None:
    stubs = Stubs(sqlite_server.port)
    collection = await stubs.set_up(runs=0)
    runs = []
    for i in range(6):  # 6 runs of 1 MiB: 6 MiB in all, over gRPC's 4 MiB receive default
        run = agent_run_to_proto(_run(i))
        run.transcripts[0].messages[0].text = "x" * (1024 * 1024)
        runs.append(run)
    assert (await stubs.upload(collection, runs)).accepted_count == 6
    plain = Stubs(sqlite_server.port, options=[])
    try:
        worker = Worker(plain)
        await worker.subscribe(credits=6)
        assert len(await worker.leases(6)) == 6
    finally:
        await plain.channel.close()
        await stubs.channel.close()


# --- names ------------------------------------------------------------------------------------


async def test_workflow_and_stage_names_follow_the_pattern_and_stages_are_limited(
    stubs: Stubs,
) -> None:
    for workflow, field in [
        (wf_pb.Workflow(name="my flow", stages=[wf_pb.Stage(name="work")]), "workflow.name"),
        (wf_pb.Workflow(name="wf", stages=[wf_pb.Stage(name="\x1b[31m")]), "stages[0].name"),
        (
            wf_pb.Workflow(name="wf", stages=[wf_pb.Stage(name=f"s{i}") for i in range(201)]),
            "201 stages, over the limit of 200",
        ),
    ]:
        code, details = await _code(
            stubs.orch.ApplyWorkflow(pb.ApplyWorkflowRequest(workflow=workflow))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and field in details, details


async def test_collection_names_are_nfc_and_printable(stubs: Stubs) -> None:
    composed = await stubs.ingest.CreateCollection(
        ingest_pb.CreateCollectionRequest(name="caf\u00e9")
    )
    decomposed = await stubs.ingest.CreateCollection(
        ingest_pb.CreateCollectionRequest(name="cafe\u0301")
    )
    assert composed.created and not decomposed.created
    assert decomposed.collection.id == composed.collection.id
    found = await stubs.ingest.GetCollection(ingest_pb.GetCollectionRequest(name="cafe\u0301"))
    assert found.collection.id == composed.collection.id
    for name in ("evil\u202etxt", "red\x1b[31m", "tab\there"):
        code, details = await _code(
            stubs.ingest.CreateCollection(ingest_pb.CreateCollectionRequest(name=name))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "not printable" in details


async def test_the_cli_escapes_what_it_prints(sqlite_server: Server, tmp_path: Any) -> None:
    """A failure's error is free text, and a collection named before names were checked may hold
    anything: `stats`, `tasks list` and `tasks show` print escape sequences and right-to-left
    overrides escaped, never raw."""
    import sqlite3
    import subprocess
    import sys

    stubs = Stubs(sqlite_server.port)
    await stubs.set_up(runs=1)
    worker = Worker(stubs)
    await worker.subscribe()
    (lease,) = await worker.leases(1)
    evil = "boom\x1b[2J\x1b]0;owned\x07 \u202etxt.exe\nsecond line"
    (ack,) = await worker.send(
        fail_tasks=pb.FailTasks(
            failures=[
                pb.TaskFailure(
                    task_id=lease.task_id, lease_id=lease.lease_id, error=evil, non_retryable=True
                )
            ]
        )
    )
    assert ack.code == 0
    with sqlite3.connect(tmp_path / "a.db") as db:  # stored before names were checked
        db.execute("UPDATE collections SET name = 'red\x1b[31m\u202e'")
    url = f"127.0.0.1:{sqlite_server.port}"
    outputs = []
    for command in (
        ["stats"],
        ["tasks", "list", "wf", "--state", "dead"],
        ["tasks", "show", lease.task_id],
    ):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agentrun._cli", *command, "--server", url],
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(done.stdout)
    stats, listing, shown = outputs
    for out in outputs:
        assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "red\\x1b[31m\\u202e" in stats
    assert "last error: boom\\x1b[2J\\x1b]0;owned\\x07 \\u202etxt.exe\\nsecond line" in listing
    assert "attempt 1 failed (held by session " in shown  # no worker name: its session
    assert "): boom\\x1b[2J" in shown and "\n    second line" in shown
    await stubs.channel.close()


# --- storage failures ----------------------------------------------------------------------------


async def _set_max_pages(server: Server, pages: int | None) -> None:
    """Cap the SQLite file at `pages` (None: its size now) on the server's writing connections:
    SQLite's own SQLITE_FULL, as on a full disk, for whatever would grow the file."""
    engine = server._storage._engine  # type: ignore[union-attr]  # what a full disk reaches

    def cap(db: Any) -> None:
        limit = pages or db.execute("PRAGMA page_count").fetchone()[0]
        for conn in (db, engine._loop_conn):
            conn.execute(f"PRAGMA max_page_count = {limit}")

    await engine.write(cap)


async def test_a_full_disk_is_unavailable_with_retry_info_and_the_writer_delivers_later(
    sqlite_server: Server,
) -> None:
    from agentrun import AgentRunWriter
    from agentrun._retry import Backoff

    stubs = Stubs(sqlite_server.port)
    collection = await stubs.set_up(runs=0)
    await _set_max_pages(sqlite_server, None)
    big = [agent_run_to_proto(_run(i)) for i in range(200)]
    for run in big:
        run.transcripts[0].messages[0].text = "x" * 20_000
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await stubs.upload(collection, big[:50])
    assert full.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "the disk is full" in (full.value.details() or "")
    trailers = dict(full.value.trailing_metadata() or ())
    assert "grpc-status-details-bin" in trailers  # RetryInfo: the writer waits as told
    # Reads go on.
    listed = await stubs.ingest.ListCollections(ingest_pb.ListCollectionsRequest())
    assert [c.id for c in listed.collections] == [collection]

    writer = AgentRunWriter(
        collection,
        server_url=f"127.0.0.1:{sqlite_server.port}",
        backoff=Backoff(initial_seconds=0.1, max_seconds=0.5),
    )
    writer.log_agent_runs(big)
    await asyncio.sleep(1.5)  # the writer meets the full disk and keeps the runs
    await _set_max_pages(sqlite_server, 1_000_000)  # space freed
    summary = await asyncio.to_thread(writer.finish)
    assert (summary.accepted, summary.undelivered, summary.rejected) == (200, 0, [])
    count = await stubs.ingest.CountAgentRuns(
        ingest_pb.CountAgentRunsRequest(collection_id=collection)
    )
    assert count.count == 200
    await stubs.channel.close()


async def test_sqlite_synchronous_full_is_an_option(tmp_path: Any) -> None:
    from agentrun_server.storage import SqliteConfig

    for setting, pragma in (("normal", 1), ("full", 2)):
        server = await _start(tmp_path / setting, sqlite=SqliteConfig(setting))
        engine = server._storage._engine  # type: ignore[union-attr]
        got = await engine.write(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
        assert got == pragma
        assert engine._loop_conn.execute("PRAGMA synchronous").fetchone()[0] == pragma
        await server.shutdown(grace_seconds=1)
    with pytest.raises(ValueError, match="choose normal or full"):
        SqliteConfig("off")


# --- slow clients and streams that never end ----------------------------------------------------


def _idle_upload(stubs: Stubs) -> Any:
    """An upload stream that opens and never sends a message."""

    async def nothing() -> AsyncIterator[ingest_pb.UploadAgentRunsRequest]:
        await asyncio.Event().wait()
        yield ingest_pb.UploadAgentRunsRequest()

    return stubs.ingest.UploadAgentRuns(nothing())


async def test_idle_upload_streams_are_closed_and_cannot_lock_out_ingestion(tmp_path: Any) -> None:
    limits = IngestionLimits(
        max_upload_streams=4, max_upload_streams_per_peer=4, stream_idle_seconds=0.5
    )
    server = await _start(tmp_path, limits=limits)
    stubs = Stubs(server.port)
    try:
        collection = await stubs.set_up(runs=0)
        idle = [_idle_upload(stubs) for _ in range(4)]
        await asyncio.sleep(0.2)  # all four hold a slot
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.upload(collection, [agent_run_to_proto(_run(1))])
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in idle:
            code, details = await _code(call)
            assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "no message for 0.5 s" in details
        response = await stubs.upload(collection, [agent_run_to_proto(_run(1))])
        assert response.accepted_count == 1
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_streams_read_only_with_room_reserved_and_one_host_holds_only_its_share(
    tmp_path: Any,
) -> None:
    """gRPC holds a whole message in memory once a read is asked for, so a stream reads its next
    message only with max_message_bytes of room reserved; one host may hold only its share."""
    limits = IngestionLimits(
        max_message_bytes=100_000,
        max_run_bytes=90_000,
        max_pending_bytes=1_000_000,
        max_pending_bytes_per_peer=250_000,
        admission_wait_seconds=0.5,
        stream_idle_seconds=30,
    )
    server = await _start(tmp_path, limits=limits)
    stubs = Stubs(server.port)
    try:
        collection = await stubs.set_up(runs=0)
        idle = [_idle_upload(stubs) for _ in range(2)]  # each holds 100,000 of this host's 250,000
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.upload(collection, [agent_run_to_proto(_run(1))])
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details() or ""
        assert "200,000 from client host ipv4:127.0.0.1" in details
        assert "max_pending_bytes_per_peer=250000" in details
        assert retry_delay_seconds(refused.value) == 1.0  # type: ignore[arg-type]
        idle[0].cancel()  # its reservation comes back
        await asyncio.sleep(0.2)
        assert (await stubs.upload(collection, [agent_run_to_proto(_run(1))])).accepted_count == 1
        idle[1].cancel()
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_one_client_host_cannot_hold_every_stream_slot(tmp_path: Any) -> None:
    # Other hosts' slots are StreamSlots' unit test: every client here connects from 127.0.0.1.
    server = await _start(
        tmp_path,
        limits=IngestionLimits(max_upload_streams_per_peer=2, stream_idle_seconds=30),
        work_limits=WorkLimits(max_streams_per_peer=2),
    )
    stubs = Stubs(server.port)
    try:
        collection = await stubs.set_up(runs=0)
        idle = [_idle_upload(stubs) for _ in range(2)]
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.upload(collection, [agent_run_to_proto(_run(1))])
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 open from client host ipv4:127.0.0.1, at max_upload_streams_per_peer=2" in (
            refused.value.details() or ""
        )
        workers = [Worker(stubs), Worker(stubs)]
        for worker in workers:
            await worker.subscribe(credits=1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await Worker(stubs).subscribe(credits=1)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in idle:  # slots come back as streams end
            call.cancel()
        workers[0].call.cancel()
        await asyncio.sleep(0.3)
        assert (await stubs.upload(collection, [agent_run_to_proto(_run(1))])).accepted_count == 1
        await Worker(stubs).subscribe(credits=1)
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_connections_are_not_kept_forever(tmp_path: Any) -> None:
    server = await _start(
        tmp_path,
        connections=ConnectionLimits(
            max_connection_age_seconds=0.5, max_connection_age_grace_seconds=0.5
        ),
    )
    stubs = Stubs(server.port)
    try:
        await stubs.set_up(runs=0)
        aged = Worker(stubs)
        await aged.subscribe(credits=1)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await aged.next("leases", timeout_seconds=5)
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await stubs.channel.close()
        await server.shutdown(grace_seconds=1)


async def test_a_client_pinging_too_often_is_cut_off(tmp_path: Any) -> None:
    server = await _start(
        tmp_path, connections=ConnectionLimits(min_client_ping_interval_seconds=60)
    )
    setup = Stubs(server.port)
    pinger = Stubs(
        server.port,
        options=[
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", 100),
            ("grpc.http2.min_ping_interval_without_data_ms", 100),
        ],
    )
    try:
        await setup.set_up(runs=0)
        worker = Worker(pinger)
        await worker.subscribe(credits=1)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await worker.next("leases", timeout_seconds=15)  # cut off in about 4 s
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await setup.channel.close()
        await pinger.channel.close()
        await server.shutdown(grace_seconds=1)
