"""The go-grpc-prometheus metrics count real calls: codes, streams message by message, latency."""

from __future__ import annotations

import grpc
import pytest

from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from agentrun.v1 import orchestrator_service_pb2 as orchestrator_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orchestrator_grpc
from agentrun_server import Server

INGESTION = "agentrun.v1.IngestionService"
ORCHESTRATOR = "agentrun.v1.OrchestratorService"


def sample(server: Server, name: str, **labels: str) -> float:
    value = server.registry.get_sample_value(name, labels)
    assert value is not None, f"no {name} {labels}"
    return value


async def test_calls_are_counted_by_type_method_and_code(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        orchestrator = orchestrator_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await orchestrator.GetWorkflow(orchestrator_pb.GetWorkflowRequest(name="missing"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        ingestion = ingestion_grpc.IngestionServiceStub(channel)
        collection = (
            await ingestion.CreateCollection(ingestion_pb.CreateCollectionRequest(name="c"))
        ).collection
        request = ingestion_pb.UploadAgentRunsRequest(collection_id=collection.id)
        await ingestion.UploadAgentRuns(iter([request] * 3))

    unary = {"grpc_type": "unary", "grpc_service": ORCHESTRATOR, "grpc_method": "GetWorkflow"}
    assert sample(server, "grpc_server_started_total", **unary) == 1
    assert sample(server, "grpc_server_handled_total", **unary, grpc_code="NotFound") == 1
    assert sample(server, "grpc_server_handled_total", **unary, grpc_code="OK") == 0
    assert sample(server, "grpc_server_msg_received_total", **unary) == 1
    assert sample(server, "grpc_server_msg_sent_total", **unary) == 0
    assert sample(server, "grpc_server_handling_seconds_count", **unary) == 1

    stream = {
        "grpc_type": "client_stream",
        "grpc_service": INGESTION,
        "grpc_method": "UploadAgentRuns",
    }
    assert sample(server, "grpc_server_msg_received_total", **stream) == 3
    assert sample(server, "grpc_server_msg_sent_total", **stream) == 1
    assert sample(server, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
    # Methods not yet called are there at zero, as go-grpc-prometheus pre-registers them.
    work = {"grpc_type": "bidi_stream", "grpc_service": ORCHESTRATOR, "grpc_method": "Work"}
    assert sample(server, "grpc_server_started_total", **work) == 0
