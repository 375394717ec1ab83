"""Malformed messages to every RPC over a real socket: the server answers each within 5 s with a
status that names the problem (never UNKNOWN or INTERNAL, never an empty message), logs no
traceback, keeps serving, and nothing it stored makes a later read fail.

The messages come from valid ones by byte and field mutation with a fixed seed (tests/fuzzing.py);
AGENTRUN_FUZZ_CASES sets how many per RPC (default 1,500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from agentrun import AgentRun, Transcript
from agentrun._convert import agent_run_to_proto
from agentrun.chat import AssistantMessage, UserMessage
from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import orchestrator_service_pb2 as orch_pb
from agentrun.v1 import workflow_pb2 as wf_pb
from agentrun_server import Server, ServerConfig

from ..fuzzing import malformed

CASES = int(os.environ.get("AGENTRUN_FUZZ_CASES", "1500"))
WORK_STREAMS = max(50, CASES // 10)
ANSWER_SECONDS = 5.0
CONCURRENCY = 32
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CLIENT_WRITE_RACE = "Internal error from Core"
INGEST = "/agentrun.v1.IngestionService/"
ORCH = "/agentrun.v1.OrchestratorService/"


def _run(i: int) -> AgentRun:
    return AgentRun(
        id=f"fuzz-run-{i}",
        name=f"run {i}",
        transcripts={
            "main": Transcript(
                messages=[UserMessage(content="hello"), AssistantMessage(content="hi there")]
            )
        },
        metadata={"scores": {"reward": 1.0}, "model": "m"},
    )


def _workflow() -> wf_pb.Workflow:
    return wf_pb.Workflow(
        name="fuzz-flow",
        stages=[
            wf_pb.Stage(
                name="triage",
                pathways=[wf_pb.Pathway(name="ok", next_stage="review")],
                retry_policy=wf_pb.RetryPolicy(max_attempts=3),
            ),
            wf_pb.Stage(name="review"),
        ],
    )


def _encode(message: Message) -> bytes:
    return message.SerializeToString()


class Answers:
    """Every answer seen, and the ones that break the rules."""

    def __init__(self) -> None:
        self.count = 0
        self.codes: dict[grpc.StatusCode, int] = {}
        self.bad: list[str] = []

    def record(self, method: str, code: grpc.StatusCode, details: str | None, seconds: float):
        self.count += 1
        if code is grpc.StatusCode.INTERNAL and details == CLIENT_WRITE_RACE:
            # grpc-aio's client replaces the server's status with this when its write races the
            # server ending the call (grpc/grpc#36066): nothing the server sent.
            code = grpc.StatusCode.CANCELLED
        self.codes[code] = self.codes.get(code, 0) + 1
        if code in BAD_CODES:
            self.bad.append(f"{method}: {code.name}: {(details or '')[:200]}")
        elif code is not grpc.StatusCode.OK and not details:
            self.bad.append(f"{method}: {code.name} with an empty message")
        if seconds > ANSWER_SECONDS:
            self.bad.append(f"{method}: answered after {seconds:.1f} s")


async def _bounded(jobs: list[Callable[[], object]]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(job: Callable[[], object]) -> None:
        async with gate:
            await job()  # type: ignore[misc]

    await asyncio.gather(*(one(job) for job in jobs))


async def _unary(channel: grpc.aio.Channel, answers: Answers, method: str, data: bytes) -> None:
    call = channel.unary_unary(method)
    started = time.monotonic()
    try:
        await call(data, timeout=ANSWER_SECONDS + 5)
        code, details = grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details()
    answers.record(method, code, details, time.monotonic() - started)


async def _upload(channel: grpc.aio.Channel, answers: Answers, messages: list[bytes]) -> None:
    call = channel.stream_unary(INGEST + "UploadAgentRuns")
    started = time.monotonic()

    async def requests() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    try:
        await call(requests(), timeout=ANSWER_SECONDS + 5)
        code, details = grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details()
    answers.record("UploadAgentRuns", code, details, time.monotonic() - started)


async def _work(
    channel: grpc.aio.Channel,
    answers: Answers,
    rng: random.Random,
    subscribe: orch_pb.WorkRequest,
) -> None:
    """One Work stream: a (sometimes malformed) subscribe, then malformed settles of the leases
    it got, then a half-close; every response is read until the stream ends."""
    call = channel.stream_stream(ORCH + "Work")(timeout=ANSWER_SECONDS + 5)
    started = time.monotonic()
    leases: list[orch_pb.Lease] = []
    leased = asyncio.Event()

    async def read_all() -> None:
        # One reader for the whole call: cancelling a read would cancel the call.
        while (data := await call.read()) is not grpc.aio.EOF:
            response = orch_pb.WorkResponse.FromString(data)
            leases.extend(response.leases.leases)
            if leases:
                leased.set()

    reader = asyncio.create_task(read_all())
    try:
        await call.write(
            malformed(subscribe, rng) if rng.random() < 0.3 else subscribe.SerializeToString()
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leased.wait(), 0.3)
        for _ in range(rng.randint(1, 4)):
            await call.write(_settle(leases, rng))
        await call.done_writing()
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # the server ended the call first: its status says why
    with contextlib.suppress(grpc.aio.AioRpcError):
        await reader
    code, details = await call.code(), await call.details()
    answers.record("Work", code, details, time.monotonic() - started)


def _settle(leases: list[orch_pb.Lease], rng: random.Random) -> bytes:
    lease = rng.choice(leases) if leases else orch_pb.Lease(task_id="1", lease_id="x")
    task_id, lease_id = lease.task_id, lease.lease_id
    valid = rng.choice(
        [
            orch_pb.WorkRequest(
                complete_tasks=orch_pb.CompleteTasks(
                    completions=[orch_pb.TaskCompletion(task_id=task_id, lease_id=lease_id)]
                )
            ),
            orch_pb.WorkRequest(
                fail_tasks=orch_pb.FailTasks(
                    failures=[orch_pb.TaskFailure(task_id=task_id, lease_id=lease_id, error="e")]
                )
            ),
            orch_pb.WorkRequest(
                extend_leases=orch_pb.ExtendLeases(
                    extensions=[orch_pb.LeaseExtension(task_id=task_id, lease_id=lease_id)]
                )
            ),
            orch_pb.WorkRequest(
                release_tasks=orch_pb.ReleaseTasks(
                    releases=[orch_pb.TaskRelease(task_id=task_id, lease_id=lease_id)]
                )
            ),
            orch_pb.WorkRequest(grant_credits=orch_pb.GrantCredits(credits=1)),
            orch_pb.WorkRequest(drain=orch_pb.Drain()),
        ]
    )
    return malformed(valid, rng)


@pytest.fixture
async def fuzzed_server(database: str) -> AsyncIterator[Server]:
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1))
    await server.start()
    yield server
    await server.shutdown(grace_seconds=1)


async def test_malformed_messages_to_every_rpc_get_clear_answers(
    fuzzed_server: Server, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(14)
    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzzed_server.port}", options) as channel:
        create = channel.unary_unary(
            INGEST + "CreateCollection",
            request_serializer=_encode,
            response_deserializer=ingest_pb.CreateCollectionResponse.FromString,
        )
        apply = channel.unary_unary(
            ORCH + "ApplyWorkflow",
            request_serializer=_encode,
            response_deserializer=orch_pb.ApplyWorkflowResponse.FromString,
        )
        await apply(orch_pb.ApplyWorkflowRequest(workflow=_workflow()))
        collection = (
            await create(ingest_pb.CreateCollectionRequest(name="fuzz", workflow="fuzz-flow"))
        ).collection
        upload = ingest_pb.UploadAgentRunsRequest(
            collection_id=collection.id, agent_runs=[agent_run_to_proto(_run(i)) for i in range(3)]
        )
        answers = Answers()
        await _upload(channel, answers, [upload.SerializeToString()])
        assert answers.codes == {grpc.StatusCode.OK: 1}
        for i in range(40):  # tasks for the Work streams to lease
            more = ingest_pb.UploadAgentRunsRequest(
                collection_id=collection.id, agent_runs=[agent_run_to_proto(_run(100 + i))]
            )
            await _upload(channel, answers, [more.SerializeToString()])

        examples: dict[str, Message] = {
            INGEST + "CreateCollection": ingest_pb.CreateCollectionRequest(
                name="fuzz-2", description="about", workflow="fuzz-flow"
            ),
            INGEST + "GetCollection": ingest_pb.GetCollectionRequest(id=collection.id),
            INGEST + "ListCollections": ingest_pb.ListCollectionsRequest(),
            INGEST + "GetAgentRun": ingest_pb.GetAgentRunRequest(
                agent_run_id="fuzz-run-1", view=ingest_pb.AGENT_RUN_VIEW_FULL
            ),
            INGEST + "ListAgentRuns": ingest_pb.ListAgentRunsRequest(
                collection_id=collection.id, page_size=2, page_token="1"
            ),
            INGEST + "CountAgentRuns": ingest_pb.CountAgentRunsRequest(collection_id=collection.id),
            ORCH + "ApplyWorkflow": orch_pb.ApplyWorkflowRequest(workflow=_workflow()),
            ORCH + "GetWorkflow": orch_pb.GetWorkflowRequest(name="fuzz-flow"),
            ORCH + "ListWorkflows": orch_pb.ListWorkflowsRequest(),
            ORCH + "EnqueueAgentRuns": orch_pb.EnqueueAgentRunsRequest(
                workflow="fuzz-flow", stage="review", agent_run_ids=["fuzz-run-1"], priority=1
            ),
            ORCH + "GetTask": orch_pb.GetTaskRequest(task_id="1"),
            ORCH + "ListTasks": orch_pb.ListTasksRequest(
                workflow="fuzz-flow",
                stage="triage",
                state=wf_pb.TASK_STATE_READY,
                page_size=5,
                page_token="1",
            ),
            ORCH + "RedriveTasks": orch_pb.RedriveTasksRequest(
                workflow="fuzz-flow", stage="triage", task_ids=["1"]
            ),
            ORCH + "CancelTasks": orch_pb.CancelTasksRequest(
                workflow="fuzz-flow", stage="review", task_ids=["2"]
            ),
            ORCH + "GetBacklog": orch_pb.GetBacklogRequest(workflow="fuzz-flow"),
        }
        answers = Answers()
        jobs: list[Callable[[], object]] = []
        for method, example in examples.items():
            for _ in range(CASES):
                data = malformed(example, rng)
                jobs.append(lambda m=method, d=data: _unary(channel, answers, m, d))
        for _ in range(CASES // 3):
            messages = [
                malformed(upload, rng) if rng.random() < 0.7 else upload.SerializeToString()
                for _ in range(rng.randint(1, 3))
            ]
            jobs.append(lambda ms=messages: _upload(channel, answers, ms))
        subscribe = orch_pb.WorkRequest(
            subscribe=orch_pb.Subscribe(
                workflow="fuzz-flow",
                stages=[orch_pb.StageSubscription(stage="triage")],
                credits=2,
                worker="fuzzer",
            )
        )
        work_rng = random.Random(15)
        for _ in range(WORK_STREAMS):
            jobs.append(lambda: _work(channel, answers, work_rng, subscribe))
        rng.shuffle(jobs)
        await _bounded(jobs)

        kinds = sorted({bad[:160] for bad in answers.bad})
        assert answers.bad == [], (
            f"{len(answers.bad)} of {answers.count} answers break the rules, "
            f"{len(kinds)} kinds:\n" + "\n".join(kinds[:60])
        )
        # Everything stored along the way still reads back.
        for method, request in [
            (INGEST + "ListCollections", ingest_pb.ListCollectionsRequest()),
            (ORCH + "ListWorkflows", orch_pb.ListWorkflowsRequest()),
            (ORCH + "ListTasks", orch_pb.ListTasksRequest(page_size=1000)),
            (INGEST + "ListAgentRuns", ingest_pb.ListAgentRunsRequest(collection_id=collection.id)),
            (ORCH + "GetBacklog", orch_pb.GetBacklogRequest()),
        ]:
            await channel.unary_unary(method)(request.SerializeToString(), timeout=10)
        tasks = orch_pb.ListTasksResponse.FromString(
            await channel.unary_unary(ORCH + "ListTasks")(
                orch_pb.ListTasksRequest(page_size=1000).SerializeToString(), timeout=10
            )
        )
        for task in tasks.tasks[:200]:
            await channel.unary_unary(ORCH + "GetTask")(
                orch_pb.GetTaskRequest(task_id=task.id).SerializeToString(), timeout=10
            )
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("agentrun")]
    assert not tracebacks, tracebacks[0].getMessage()
    assert len(answers.codes) > 2  # the mutations reached past decoding
