"""Authentication and scopes (issue 15), through real sockets on both engines: every RPC against
every scope, keys limited to collections and workflows, health open, reflection behind a key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from agentrun import AgentRun, Transcript
from agentrun._convert import agent_run_to_proto
from agentrun.chat import UserMessage
from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingest_grpc
from agentrun.v1 import key_service_pb2 as key_pb
from agentrun.v1 import key_service_pb2_grpc as key_grpc
from agentrun.v1 import orchestrator_service_pb2 as orch_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orch_grpc
from agentrun.v1 import workflow_pb2
from agentrun_server import Server, ServerConfig
from agentrun_server._errors import PermissionDenied
from agentrun_server.auth import METHOD_SCOPES, SCOPES, AuthInterceptor, KeyRing, new_key
from agentrun_server.storage import open_storage

LIST_COLLECTIONS = "/agentrun.v1.IngestionService/ListCollections"
STREAMING_REQUESTS = {"UploadAgentRuns", "Work"}


@pytest.fixture
async def secured(database: str) -> AsyncIterator[tuple[Server, str]]:
    """A server with --auth keys and its first admin key, made on the database as `agentrun keys
    create --db` does."""
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, auth="keys"))
    await server.start()
    record, token = new_key("root", ["admin"])
    assert server._storage is not None and server._keys is not None
    await server._storage.create_key(record)
    await server._keys.reload()
    yield server, token
    await server.shutdown(grace_seconds=1)


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def _create_key(channel: grpc.aio.Channel, admin: str, name: str, scopes, **limits) -> str:
    response = await key_grpc.KeyServiceStub(channel).CreateApiKey(
        key_pb.CreateApiKeyRequest(key=key_pb.ApiKey(name=name, scopes=scopes, **limits)),
        metadata=_auth(admin),
    )
    assert response.token.startswith("ark_")
    return response.token


async def _code(channel: grpc.aio.Channel, method: str, token: str | None) -> grpc.StatusCode:
    """The status of `method` called with an empty request (or an empty stream)."""
    name = method.rsplit("/", 1)[-1]
    metadata = _auth(token)
    try:
        if name in ("Work", "StreamAgentRunEvents"):
            call = channel.stream_stream(method)(iter(()), metadata=metadata, timeout=10)
            async for _ in call:
                pass
        elif name == "WatchAgentRun":
            async for _ in channel.unary_stream(method)(b"", metadata=metadata, timeout=10):
                pass
        elif name in STREAMING_REQUESTS:
            await channel.stream_unary(method)(iter(()), metadata=metadata, timeout=10)
        else:
            await channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            assert exc.details(), method
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            needed = METHOD_SCOPES[method]
            assert all(repr(s) in exc.details() for s in needed), exc.details()
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_rpc_answers_each_scope_as_the_table_says(secured: tuple[Server, str]) -> None:
    server, admin = secured
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        tokens = {scope: await _create_key(channel, admin, scope, [scope]) for scope in SCOPES}
        for method, accepted in METHOD_SCOPES.items():
            assert await _code(channel, method, None) == grpc.StatusCode.UNAUTHENTICATED, method
            assert (
                await _code(channel, method, "ark_not-a-key") == grpc.StatusCode.UNAUTHENTICATED
            ), method
            for scope, token in tokens.items():
                code = await _code(channel, method, token)
                allowed = scope in accepted or scope == "admin"
                if allowed:
                    assert code not in (
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED,
                    ), (method, scope, code)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method, scope, code)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_health_stays_open_and_reflection_needs_a_key(
    secured: tuple[Server, str], version: str
) -> None:
    server, admin = secured
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        # v1's messages are v1alpha's under another package: one encoding serves both.
        reflect = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in reflect(iter([request])):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reader = await _create_key(channel, admin, "reader", ["read"])
        answers = [a async for a in reflect(iter([request]), metadata=_auth(reader))]
        names = {s.name for s in answers[0].list_services_response.service}
        assert "agentrun.v1.KeyService" in names


def _run(run_id: str) -> run_pb.AgentRun:
    return agent_run_to_proto(
        AgentRun(
            id=run_id,
            transcripts={"main": Transcript(messages=[UserMessage(content="hello")])},
            metadata={"scores": {"reward": 1.0}},
        )
    )


async def test_a_key_limited_to_a_collection_touches_only_that_collection(
    secured: tuple[Server, str],
) -> None:
    server, admin = secured
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingestion = ingest_grpc.IngestionServiceStub(channel)
        b = await ingestion.CreateCollection(
            ingest_pb.CreateCollectionRequest(name="b"), metadata=_auth(admin)
        )
        writer = await _create_key(channel, admin, "writer-a", ["ingest"], collections=["a"])
        reader = await _create_key(channel, admin, "reader-a", ["read"], collections=["a"])
        a = await ingestion.CreateCollection(
            ingest_pb.CreateCollectionRequest(name="a"), metadata=_auth(writer)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ingestion.CreateCollection(
                ingest_pb.CreateCollectionRequest(name="c"), metadata=_auth(writer)
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "collection 'c'" in refused.value.details()

        async def upload(collection_id: str, run_id: str) -> ingest_pb.UploadAgentRunsResponse:
            request = ingest_pb.UploadAgentRunsRequest(
                collection_id=collection_id, agent_runs=[_run(run_id)]
            )
            return await ingestion.UploadAgentRuns(iter([request]), metadata=_auth(writer))

        assert (await upload(a.collection.id, "in-a")).accepted_count == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload(b.collection.id, "in-b")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        admin_upload = ingest_pb.UploadAgentRunsRequest(
            collection_id=b.collection.id, agent_runs=[_run("in-b")]
        )
        await ingestion.UploadAgentRuns(iter([admin_upload]), metadata=_auth(admin))

        listed = await ingestion.ListCollections(
            ingest_pb.ListCollectionsRequest(), metadata=_auth(reader)
        )
        assert [c.name for c in listed.collections] == ["a"]
        got = await ingestion.GetAgentRun(
            ingest_pb.GetAgentRunRequest(agent_run_id="in-a"), metadata=_auth(reader)
        )
        assert got.agent_run.agent_run.id == "in-a"
        for call in (
            ingestion.GetAgentRun(
                ingest_pb.GetAgentRunRequest(agent_run_id="in-b"), metadata=_auth(reader)
            ),
            ingestion.ListAgentRuns(
                ingest_pb.ListAgentRunsRequest(collection_id=b.collection.id),
                metadata=_auth(reader),
            ),
            ingestion.CountAgentRuns(
                ingest_pb.CountAgentRunsRequest(collection_id=b.collection.id),
                metadata=_auth(reader),
            ),
            ingestion.GetCollection(
                ingest_pb.GetCollectionRequest(name="b"), metadata=_auth(reader)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "reader-a" in refused.value.details()


def _workflow(name: str) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(name=name, stages=[workflow_pb2.Stage(name="grade")])


async def test_a_worker_key_limited_to_a_workflow_cannot_lease_or_read_another(
    secured: tuple[Server, str],
) -> None:
    server, admin = secured
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        orchestrator = orch_grpc.OrchestratorServiceStub(channel)
        ingestion = ingest_grpc.IngestionServiceStub(channel)
        for name in ("w", "w2"):
            await orchestrator.ApplyWorkflow(
                orch_pb.ApplyWorkflowRequest(workflow=_workflow(name)), metadata=_auth(admin)
            )
        for collection, workflow in (("feeds-w", "w"), ("feeds-w2", "w2")):
            created = await ingestion.CreateCollection(
                ingest_pb.CreateCollectionRequest(name=collection, workflow=workflow),
                metadata=_auth(admin),
            )
            request = ingest_pb.UploadAgentRunsRequest(
                collection_id=created.collection.id, agent_runs=[_run(f"run-{workflow}")]
            )
            await ingestion.UploadAgentRuns(iter([request]), metadata=_auth(admin))
        worker = await _create_key(channel, admin, "worker-w", ["work", "read"], workflows=["w"])

        async def subscribe(workflow: str) -> orch_pb.WorkResponse:
            call = orchestrator.Work(metadata=_auth(worker))
            await call.write(
                orch_pb.WorkRequest(
                    subscribe=orch_pb.Subscribe(
                        workflow=workflow,
                        stages=[orch_pb.StageSubscription(stage="grade")],
                        credits=1,
                    )
                )
            )
            try:
                first = await call.read()
                second = await call.read()  # the lease of the run
                return second if second is not grpc.aio.EOF else first
            finally:
                call.cancel()

        leased = await subscribe("w")
        assert [lease.agent_run.id for lease in leased.leases.leases] == ["run-w"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await subscribe("w2")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "subscribe.workflow" in refused.value.details()

        listed = await ingestion.ListCollections(
            ingest_pb.ListCollectionsRequest(), metadata=_auth(worker)
        )
        assert [c.name for c in listed.collections] == ["feeds-w"]  # bound to its workflow
        workflows = await orchestrator.ListWorkflows(
            orch_pb.ListWorkflowsRequest(), metadata=_auth(worker)
        )
        assert [w.name for w in workflows.workflows] == ["w"]
        tasks = await orchestrator.ListTasks(
            orch_pb.ListTasksRequest(workflow="w2"), metadata=_auth(admin)
        )
        for call in (
            orchestrator.GetTask(
                orch_pb.GetTaskRequest(task_id=tasks.tasks[0].id), metadata=_auth(worker)
            ),
            orchestrator.ListTasks(orch_pb.ListTasksRequest(workflow="w2"), metadata=_auth(worker)),
            orchestrator.ListTasks(orch_pb.ListTasksRequest(), metadata=_auth(worker)),
            orchestrator.ListTasks(
                orch_pb.ListTasksRequest(agent_run_id="run-w2"), metadata=_auth(worker)
            ),
            ingestion.GetAgentRun(
                ingest_pb.GetAgentRunRequest(agent_run_id="run-w2"), metadata=_auth(worker)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        backlog = await orchestrator.GetBacklog(orch_pb.GetBacklogRequest(), metadata=_auth(worker))
        assert {s.workflow for s in backlog.stages} == {"w"}
        # A run's tasks: its own run's, without naming the workflow (the web console's run page).
        own = await orchestrator.ListTasks(
            orch_pb.ListTasksRequest(agent_run_id="run-w"), metadata=_auth(worker)
        )
        assert [(t.workflow, t.agent_run_id) for t in own.tasks] == [("w", "run-w")]


async def test_only_an_unlimited_admin_manages_keys(secured: tuple[Server, str]) -> None:
    server, admin = secured
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        limited = await _create_key(channel, admin, "ops-a", ["admin"], collections=["a"])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _create_key(channel, limited, "escalated", ["admin"])
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        keys = key_grpc.KeyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _create_key(channel, admin, "bad", ["superuser"])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'superuser'" in refused.value.details()
        listed = await keys.ListApiKeys(key_pb.ListApiKeysRequest(), metadata=_auth(admin))
        assert [k.name for k in listed.keys] == ["ops-a", "root"]
        await keys.RevokeApiKey(key_pb.RevokeApiKeyRequest(name="ops-a"), metadata=_auth(admin))
        # Revoked through this server: refused here at once.
        assert await _code(channel, LIST_COLLECTIONS, limited) == grpc.StatusCode.UNAUTHENTICATED


async def test_every_admin_action_is_one_audit_line_naming_the_key(
    secured: tuple[Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, admin = secured
    caplog.set_level("INFO", logger="agentrun.audit")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        orchestrator = orch_grpc.OrchestratorServiceStub(channel)
        meta = _auth(admin)
        await orchestrator.ApplyWorkflow(
            orch_pb.ApplyWorkflowRequest(workflow=_workflow("w")), metadata=meta
        )
        collection = await ingest_grpc.IngestionServiceStub(channel).CreateCollection(
            ingest_pb.CreateCollectionRequest(name="c"), metadata=meta
        )
        upload = ingest_pb.UploadAgentRunsRequest(
            collection_id=collection.collection.id, agent_runs=[_run("r")]
        )
        await ingest_grpc.IngestionServiceStub(channel).UploadAgentRuns(
            iter([upload]), metadata=meta
        )
        await orchestrator.EnqueueAgentRuns(
            orch_pb.EnqueueAgentRunsRequest(workflow="w", agent_run_ids=["r"]), metadata=meta
        )
        await orchestrator.CancelTasks(
            orch_pb.CancelTasksRequest(workflow="w", stage="grade"), metadata=meta
        )
        await orchestrator.RedriveTasks(
            orch_pb.RedriveTasksRequest(workflow="w", stage="grade"), metadata=meta
        )
        await _create_key(channel, admin, "ci", ["ingest"])
        await key_grpc.KeyServiceStub(channel).RevokeApiKey(
            key_pb.RevokeApiKeyRequest(name="ci"), metadata=meta
        )
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "agentrun.audit"]
    assert [line["audit"] for line in lines] == [
        "workflow.apply",
        "runs.enqueue",
        "tasks.cancel",
        "tasks.redrive",
        "keys.create",
        "keys.revoke",
    ]
    assert {line["key"] for line in lines} == {"root"}
    assert lines[1]["workflow"] == "w" and lines[1]["enqueued"] == 1
    assert lines[2]["count"] == 1
    assert lines[4]["name"] == "ci" and lines[4]["scopes"] == ["ingest"]


async def test_refused_calls_are_counted_by_reason_and_logged_once_in_a_while(
    secured: tuple[Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = secured
    caplog.set_level("WARNING", logger="agentrun_server.auth._interceptor")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for _ in range(30):
            await _code(channel, LIST_COLLECTIONS, "ark_guessing")
        for _ in range(5):
            await _code(channel, LIST_COLLECTIONS, None)

    def refused(reason: str) -> float | None:
        return server.registry.get_sample_value("agentrun_auth_refused_total", {"reason": reason})

    assert (refused("unknown_key"), refused("no_credentials"), refused("scope")) == (30, 5, 0)
    lines = [r for r in caplog.records if r.name == "agentrun_server.auth._interceptor"]
    assert len(lines) == 1  # 35 refusals, one line per 10 s at most
    assert "ipv4:127.0.0.1" in lines[0].getMessage()


async def test_a_method_without_scopes_is_refused_to_every_key(database: str) -> None:
    """Fail closed: a method served but missing from the scope table (a bug) admits no key."""
    storage = await open_storage(database)
    try:
        record, token = new_key("root", ["admin"])
        await storage.create_key(record)
        ring = KeyRing(storage)
        await ring.reload()

        async def behavior(request: bytes, context: object) -> bytes:
            return b"served"

        async def continuation(details: object) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(behavior)

        class Details:
            method = "/agentrun.v1.IngestionService/DeleteEverything"
            invocation_metadata = (("authorization", f"Bearer {token}"),)

        class Context:
            def auth_context(self) -> dict[str, list[bytes]]:
                return {}

            def peer(self) -> str:
                return "ipv4:127.0.0.1:1"

        handler = await AuthInterceptor(ring).intercept_service(continuation, Details())
        with pytest.raises(PermissionDenied, match="no scope admits this method"):
            await handler.unary_unary(b"", Context())
    finally:
        await storage.close()
