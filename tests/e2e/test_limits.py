"""Keys limited to collections and workflows (issue 23), on both engines: every RPC of the
contract, taken from the services' descriptors, called by a limited key once naming what the key
may touch and once naming what it may not. A new RPC fails `test_every_rpc_is_covered` until its
limits are decided here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun import AgentRun, Transcript
from agentrun._convert import agent_run_to_proto
from agentrun.chat import UserMessage
from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import key_service_pb2 as key_pb
from agentrun.v1 import orchestrator_service_pb2 as orch_pb
from agentrun.v1 import workflow_pb2
from agentrun_server import Server, ServerConfig
from agentrun_server.auth import METHOD_SCOPES, new_key

from .test_auth import _auth, _create_key

DENIED = grpc.StatusCode.PERMISSION_DENIED


def _run(run_id: str) -> run_pb.AgentRun:
    return agent_run_to_proto(
        AgentRun(
            id=run_id,
            transcripts={"main": Transcript(messages=[UserMessage(content="hello")])},
            metadata={"scores": {"reward": 1.0}},
        )
    )


def _workflow(name: str) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(name=name, stages=[workflow_pb2.Stage(name="grade")])


@dataclass
class World:
    """What the admin made: collections by name (ids), tasks by workflow (ids)."""

    collections: dict[str, str]
    tasks: dict[str, str]


Request = Callable[[World], Message]


def _event(collection: str, run_id: str) -> Request:
    return lambda w: ingest_pb.StreamAgentRunEventsRequest(
        events=[
            ingest_pb.AgentRunEvent(
                agent_run_id=run_id,
                sequence=1,
                collection_id=w.collections[collection],
                patch=run_pb.AgentRun(
                    transcripts=[
                        run_pb.Transcript(
                            key="main",
                            messages=[run_pb.ChatMessage(text="hi", user=run_pb.UserRole())],
                        )
                    ]
                ),
            )
        ]
    )


def _subscribe(workflow: str) -> Request:
    return lambda w: orch_pb.WorkRequest(
        subscribe=orch_pb.Subscribe(
            workflow=workflow, stages=[orch_pb.StageSubscription(stage="grade")], credits=1
        )
    )


# Per RPC: requests naming only what the limited key may touch (inside), and requests naming
# something it may not (outside). The key is limited to collections `mine` and `fresh` (not made
# yet) and workflow `w`, so it sees `mine`, `bound` (bound to `w`) and `w`; not `other`, `xs`
# (bound to `x`) or `x`.
CASES: dict[str, tuple[list[Request], list[Request]]] = {
    "CreateCollection": (
        [
            lambda w: ingest_pb.CreateCollectionRequest(name="mine"),
            lambda w: ingest_pb.CreateCollectionRequest(name="new-in-w", workflow="w"),
        ],
        [
            lambda w: ingest_pb.CreateCollectionRequest(name="other"),
            lambda w: ingest_pb.CreateCollectionRequest(name="elsewhere", workflow="x"),
            # A key limited to `fresh` binds it to no workflow outside its limits (else its
            # uploads would become that workflow's tasks).
            lambda w: ingest_pb.CreateCollectionRequest(name="fresh", workflow="x"),
        ],
    ),
    "GetCollection": (
        [lambda w: ingest_pb.GetCollectionRequest(name="bound")],
        [
            lambda w: ingest_pb.GetCollectionRequest(name="other"),
            lambda w: ingest_pb.GetCollectionRequest(id=w.collections["xs"]),
        ],
    ),
    "ListCollections": ([lambda w: ingest_pb.ListCollectionsRequest()], []),
    "UploadAgentRuns": (
        [
            lambda w: ingest_pb.UploadAgentRunsRequest(
                collection_id=w.collections["mine"], agent_runs=[_run("new-in-mine")]
            )
        ],
        [
            lambda w: ingest_pb.UploadAgentRunsRequest(
                collection_id=w.collections["other"], agent_runs=[_run("new-in-other")]
            )
        ],
    ),
    "GetAgentRun": (
        [lambda w: ingest_pb.GetAgentRunRequest(agent_run_id="run-bound")],
        [lambda w: ingest_pb.GetAgentRunRequest(agent_run_id="run-other")],
    ),
    "ListAgentRuns": (
        [lambda w: ingest_pb.ListAgentRunsRequest(collection_id=w.collections["mine"])],
        [lambda w: ingest_pb.ListAgentRunsRequest(collection_id=w.collections["other"])],
    ),
    "StreamAgentRunEvents": (
        [_event("mine", "live-in-mine")],
        [_event("other", "live-in-other")],
    ),
    "WatchAgentRun": (
        [lambda w: ingest_pb.WatchAgentRunRequest(agent_run_id="run-bound")],
        [lambda w: ingest_pb.WatchAgentRunRequest(agent_run_id="run-other")],
    ),
    "CountAgentRuns": (
        [lambda w: ingest_pb.CountAgentRunsRequest(collection_id=w.collections["mine"])],
        [lambda w: ingest_pb.CountAgentRunsRequest(collection_id=w.collections["xs"])],
    ),
    # Deleting: the inside cases touch nothing the later cases need (a collection not made, a run
    # never stored, runs stored before 1970).
    "UpdateCollection": (
        [lambda w: ingest_pb.UpdateCollectionRequest(name="mine", description="kept")],
        [
            lambda w: ingest_pb.UpdateCollectionRequest(name="other", retention_days=1),
            lambda w: ingest_pb.UpdateCollectionRequest(id=w.collections["xs"], description=""),
        ],
    ),
    "DeleteCollection": (
        [lambda w: ingest_pb.DeleteCollectionRequest(name="fresh")],
        [
            lambda w: ingest_pb.DeleteCollectionRequest(name="other"),
            lambda w: ingest_pb.DeleteCollectionRequest(id=w.collections["xs"]),
        ],
    ),
    "DeleteAgentRuns": (
        [
            lambda w: ingest_pb.DeleteAgentRunsRequest(agent_run_ids=["never-stored"]),
            lambda w: ingest_pb.DeleteAgentRunsRequest(
                collection_id=w.collections["mine"], ingested_before=Timestamp(seconds=1)
            ),
        ],
        [
            lambda w: ingest_pb.DeleteAgentRunsRequest(agent_run_ids=["run-other"]),
            lambda w: ingest_pb.DeleteAgentRunsRequest(
                collection_id=w.collections["xs"], ingested_before=Timestamp(seconds=1)
            ),
        ],
    ),
    "ApplyWorkflow": (
        [lambda w: orch_pb.ApplyWorkflowRequest(workflow=_workflow("w"))],
        [lambda w: orch_pb.ApplyWorkflowRequest(workflow=_workflow("x"))],
    ),
    "GetWorkflow": (
        [lambda w: orch_pb.GetWorkflowRequest(name="w")],
        [lambda w: orch_pb.GetWorkflowRequest(name="x")],
    ),
    "ListWorkflows": ([lambda w: orch_pb.ListWorkflowsRequest()], []),
    "EnqueueAgentRuns": (
        [lambda w: orch_pb.EnqueueAgentRunsRequest(workflow="w", agent_run_ids=["run-mine"])],
        [
            lambda w: orch_pb.EnqueueAgentRunsRequest(workflow="x", agent_run_ids=["run-mine"]),
            # The workflow is the key's, the run's collection is not: its workers would get it.
            lambda w: orch_pb.EnqueueAgentRunsRequest(
                workflow="w", agent_run_ids=["run-mine", "run-other"]
            ),
        ],
    ),
    "Work": ([_subscribe("w")], [_subscribe("x")]),
    "GetTask": (
        [lambda w: orch_pb.GetTaskRequest(task_id=w.tasks["w"])],
        [lambda w: orch_pb.GetTaskRequest(task_id=w.tasks["x"])],
    ),
    "ListTasks": (
        [lambda w: orch_pb.ListTasksRequest(workflow="w")],
        [
            lambda w: orch_pb.ListTasksRequest(workflow="x"),
            lambda w: orch_pb.ListTasksRequest(),  # every workflow
        ],
    ),
    "RedriveTasks": (
        [lambda w: orch_pb.RedriveTasksRequest(workflow="w")],
        [lambda w: orch_pb.RedriveTasksRequest(workflow="x")],
    ),
    "CancelTasks": (
        [lambda w: orch_pb.CancelTasksRequest(workflow="w", task_ids=[w.tasks["w"]])],
        [lambda w: orch_pb.CancelTasksRequest(workflow="x", task_ids=[w.tasks["x"]])],
    ),
    "GetBacklog": (
        [lambda w: orch_pb.GetBacklogRequest(workflow="w")],
        [lambda w: orch_pb.GetBacklogRequest(workflow="x")],
    ),
    # Keys: only an admin key without limits manages them.
    "CreateApiKey": (
        [],
        [
            lambda w: key_pb.CreateApiKeyRequest(
                key=key_pb.ApiKey(name="made-by-limited", scopes=["read"], collections=["mine"])
            )
        ],
    ),
    "ListApiKeys": ([], [lambda w: key_pb.ListApiKeysRequest()]),
    "RevokeApiKey": ([], [lambda w: key_pb.RevokeApiKeyRequest(name="root")]),
}


SERVICES = (
    ingest_pb.DESCRIPTOR.services_by_name["IngestionService"],
    orch_pb.DESCRIPTOR.services_by_name["OrchestratorService"],
    key_pb.DESCRIPTOR.services_by_name["KeyService"],
)


def _contract_methods() -> dict[str, Any]:
    return {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}


def test_every_rpc_is_covered() -> None:
    """Each RPC of the contract has its limits cases here and its scopes in the table."""
    methods = _contract_methods()
    assert {path.rsplit("/", 1)[-1] for path in methods} == set(CASES)
    assert set(methods) <= set(METHOD_SCOPES)


async def _call(channel: grpc.aio.Channel, method: Any, path: str, request: Message, token: str):
    """Call `method` (a descriptor) with one request; its status code. A refused live run event
    is answered in its ack: its code is the call's here."""
    metadata = _auth(token)
    decode = GetMessageClass(method.output_type).FromString
    encode = type(request).SerializeToString
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, encode, decode)(metadata=metadata, timeout=10)
            await call.write(request)
            response = await call.read()
            call.cancel()
            if isinstance(response, ingest_pb.StreamAgentRunEventsResponse):
                code = response.acks[0].code
                return next(c for c in grpc.StatusCode if c.value[0] == code)
        elif method.client_streaming:
            await channel.stream_unary(path, encode, decode)(
                iter([request]), metadata=metadata, timeout=10
            )
        elif method.server_streaming:
            call = channel.unary_stream(path, encode, decode)(
                request, metadata=metadata, timeout=10
            )
            await call.read()
            call.cancel()
        else:
            await channel.unary_unary(path, encode, decode)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def world(database: str) -> AsyncIterator[tuple[Server, str, World]]:
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, auth="keys"))
    await server.start()
    record, admin = new_key("root", ["admin"])
    assert server._storage is not None and server._keys is not None
    await server._storage.create_key(record)
    await server._keys.reload()
    meta = _auth(admin)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from agentrun.v1 import ingestion_service_pb2_grpc as ingest_grpc
        from agentrun.v1 import orchestrator_service_pb2_grpc as orch_grpc

        ingestion = ingest_grpc.IngestionServiceStub(channel)
        orchestrator = orch_grpc.OrchestratorServiceStub(channel)
        for name in ("w", "x"):
            await orchestrator.ApplyWorkflow(
                orch_pb.ApplyWorkflowRequest(workflow=_workflow(name)), metadata=meta
            )
        collections = {}
        for name, workflow in (("mine", ""), ("bound", "w"), ("other", ""), ("xs", "x")):
            made = await ingestion.CreateCollection(
                ingest_pb.CreateCollectionRequest(name=name, workflow=workflow), metadata=meta
            )
            collections[name] = made.collection.id
            run_id = f"run-{name}"
            await ingestion.UploadAgentRuns(
                iter(
                    [
                        ingest_pb.UploadAgentRunsRequest(
                            collection_id=made.collection.id, agent_runs=[_run(run_id)]
                        )
                    ]
                ),
                metadata=meta,
            )
        tasks = {}
        for workflow in ("w", "x"):
            listed = await orchestrator.ListTasks(
                orch_pb.ListTasksRequest(workflow=workflow), metadata=meta
            )
            tasks[workflow] = listed.tasks[0].id
    yield server, admin, World(collections, tasks)
    await server.shutdown(grace_seconds=1)


async def test_every_rpc_refuses_what_a_limited_key_may_not_touch(
    world: tuple[Server, str, World],
) -> None:
    server, admin, made = world
    methods = _contract_methods()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        keys = {
            scope: await _create_key(
                channel,
                admin,
                f"limited-{scope}",
                [scope],
                collections=["mine", "fresh"],
                workflows=["w"],
            )
            for scope in ("ingest", "read", "work", "admin")
        }
        for path, method in methods.items():
            inside, outside = CASES[method.name]
            token = keys[METHOD_SCOPES[path][0]]
            for request in outside:
                code = await _call(channel, method, path, request(made), token)
                assert code == DENIED, (method.name, request(made), code)
            for request in inside:
                code = await _call(channel, method, path, request(made), token)
                assert code != DENIED, (method.name, request(made), code)


async def test_a_key_limited_to_a_workflow_cannot_feed_its_workers_runs_it_cannot_read(
    world: tuple[Server, str, World],
) -> None:
    """The attack of issue 23: an admin key limited to `w` enqueued runs of another collection,
    and `w`'s worker then received them whole in its leases."""
    server, admin, _ = world
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from agentrun.v1 import orchestrator_service_pb2_grpc as orch_grpc

        orchestrator = orch_grpc.OrchestratorServiceStub(channel)
        ops = await _create_key(channel, admin, "ops-w", ["admin"], workflows=["w"])
        worker = await _create_key(channel, admin, "worker-w", ["work"], workflows=["w"])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await orchestrator.EnqueueAgentRuns(
                orch_pb.EnqueueAgentRunsRequest(workflow="w", agent_run_ids=["run-other"]),
                metadata=_auth(ops),
            )
        assert refused.value.code() == DENIED
        assert "agent_run_ids[0]" in refused.value.details()
        assert "'other'" in refused.value.details()
        # `w`'s worker gets the run of the collection bound to `w`, and nothing else.
        call = orchestrator.Work(metadata=_auth(worker))
        await call.write(_subscribe("w")(World({}, {})))
        await call.read()  # subscribed
        leased = await call.read()
        call.cancel()
        assert [lease.agent_run.id for lease in leased.leases.leases] == ["run-bound"]


async def test_a_conflict_names_the_other_collection_only_to_a_key_that_may_see_it(
    world: tuple[Server, str, World],
) -> None:
    server, admin, made = world
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from agentrun.v1 import ingestion_service_pb2_grpc as ingest_grpc

        ingestion = ingest_grpc.IngestionServiceStub(channel)
        writer = await _create_key(channel, admin, "writer-mine", ["ingest"], collections=["mine"])

        async def upload(token: str) -> ingest_pb.UploadAgentRunsResponse:
            request = ingest_pb.UploadAgentRunsRequest(
                collection_id=made.collections["mine"], agent_runs=[_run("run-other")]
            )
            return await ingestion.UploadAgentRuns(iter([request]), metadata=_auth(token))

        limited = (await upload(writer)).rejected[0]
        assert limited.reason == ingest_pb.REJECTION_REASON_CONFLICT
        assert made.collections["other"] not in limited.message
        unlimited = (await upload(admin)).rejected[0]
        assert made.collections["other"] in unlimited.message
