"""The services over real sockets: partial success and pathway validation on the wire."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from agentrun import AgentRun, BaseAgentRunMetadata, Transcript, agent_run_to_proto
from agentrun.chat import UserMessage
from agentrun.v1 import agent_run_pb2, workflow_pb2
from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from agentrun.v1 import orchestrator_service_pb2 as orchestrator_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orchestrator_grpc
from agentrun_server import IngestionLimits, Server, ServerConfig


def make_run(i: int) -> agent_run_pb2.AgentRun:
    run = AgentRun(
        id=f"run-{i}",
        transcripts={"t": Transcript(messages=[UserMessage(content=f"hello {i}")])},
        metadata=BaseAgentRunMetadata(scores={"reward": float(i)}),
    )
    return agent_run_to_proto(run)


async def test_one_invalid_run_does_not_fail_its_batch(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = ingestion_grpc.IngestionServiceStub(channel)
        collection = (
            await stub.CreateCollection(ingestion_pb.CreateCollectionRequest(name="c"))
        ).collection
        runs = [make_run(i) for i in range(5)]
        del runs[2].transcripts[:]  # no transcripts: invalid
        response = await stub.UploadAgentRuns(
            iter(
                [ingestion_pb.UploadAgentRunsRequest(collection_id=collection.id, agent_runs=runs)]
            )
        )
        assert response.accepted_count == 4
        assert response.duplicate_count == 0
        (rejected,) = response.rejected
        assert (rejected.index, rejected.agent_run_id) == (2, "run-2")
        assert rejected.reason == ingestion_pb.REJECTION_REASON_INVALID
        assert rejected.field == "transcripts"
        count = await stub.CountAgentRuns(
            ingestion_pb.CountAgentRunsRequest(collection_id=collection.id)
        )
        assert count.count == 4
        # The server keeps serving, and a resend stores nothing twice.
        again = await stub.UploadAgentRuns(
            iter(
                [ingestion_pb.UploadAgentRunsRequest(collection_id=collection.id, agent_runs=runs)]
            )
        )
        assert (again.accepted_count, again.duplicate_count, len(again.rejected)) == (0, 4, 1)


async def test_too_many_runs_in_a_message_names_the_limit(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = ingestion_grpc.IngestionServiceStub(channel)
        collection = (
            await stub.CreateCollection(ingestion_pb.CreateCollectionRequest(name="c"))
        ).collection
        limit = server.config.limits.max_runs_per_message
        request = ingestion_pb.UploadAgentRunsRequest(
            collection_id=collection.id, agent_runs=[make_run(0)] * (limit + 1)
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.UploadAgentRuns(iter([request]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"max_runs_per_message={limit}" in (error.value.details() or "")


async def test_a_pathway_the_stage_lacks_is_rejected_with_the_valid_ones(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        orchestrator = orchestrator_grpc.OrchestratorServiceStub(channel)
        ingestion = ingestion_grpc.IngestionServiceStub(channel)
        workflow = workflow_pb2.Workflow(
            name="w",
            stages=[
                workflow_pb2.Stage(
                    name="grade",
                    pathways=[
                        workflow_pb2.Pathway(name="pass", next_stage="review"),
                        workflow_pb2.Pathway(name="fail"),
                    ],
                ),
                workflow_pb2.Stage(name="review"),
            ],
        )
        await orchestrator.ApplyWorkflow(orchestrator_pb.ApplyWorkflowRequest(workflow=workflow))
        collection = (
            await ingestion.CreateCollection(
                ingestion_pb.CreateCollectionRequest(name="c", workflow="w")
            )
        ).collection
        await ingestion.UploadAgentRuns(
            iter(
                [
                    ingestion_pb.UploadAgentRunsRequest(
                        collection_id=collection.id, agent_runs=[make_run(1)]
                    )
                ]
            )
        )

        call = orchestrator.Work()
        await call.write(
            orchestrator_pb.WorkRequest(
                subscribe=orchestrator_pb.Subscribe(
                    workflow="w",
                    stages=[orchestrator_pb.StageSubscription(stage="grade")],
                    credits=4,
                )
            )
        )
        assert (await call.read()).WhichOneof("kind") == "subscribed"
        leases = (await call.read()).leases.leases
        assert len(leases) == 1 and leases[0].agent_run.id == "run-1" and leases[0].attempt == 1
        lease = leases[0]

        def complete(pathway: str) -> orchestrator_pb.WorkRequest:
            return orchestrator_pb.WorkRequest(
                complete_tasks=orchestrator_pb.CompleteTasks(
                    completions=[
                        orchestrator_pb.TaskCompletion(
                            task_id=lease.task_id, lease_id=lease.lease_id, pathway=pathway
                        )
                    ]
                )
            )

        await call.write(complete("maybe"))
        (ack,) = (await call.read()).acks.acks
        assert ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "'pass', 'fail'" in ack.message
        # The task is still leased to this stream: a valid pathway completes it.
        await call.write(complete("pass"))
        (ack,) = (await call.read()).acks.acks
        assert ack.code == 0 and ack.next_task_id
        await call.done_writing()

        backlog = await orchestrator.GetBacklog(orchestrator_pb.GetBacklogRequest(workflow="w"))
        counts = {s.stage: (s.done_count, s.ready_count) for s in backlog.stages}
        assert counts == {"grade": (1, 0), "review": (0, 1)}


async def test_run_pages_stay_under_the_message_limit_and_page_through_every_run(
    tmp_path: Path,
) -> None:
    # 64 KiB messages: pages hold at most 32 KiB of runs, so 3 of these 10 kB runs each, however
    # large a page_size is asked for. Before, one page of all ten went over the limit and failed.
    limits = IngestionLimits(max_message_bytes=64 * 1024)
    config = ServerConfig(
        db=f"sqlite:///{tmp_path / 'agentrun.db'}",
        port=0,
        metrics_port=-1,
        web_port=-1,
        limits=limits,
    )
    server = Server(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingestion_grpc.IngestionServiceStub(channel)
            collection = (
                await stub.CreateCollection(ingestion_pb.CreateCollectionRequest(name="c"))
            ).collection
            for i in range(10):  # one per message: each fits, two would not
                run = make_run(i)
                run.transcripts[0].messages[0].text = "x" * 10_000
                await stub.UploadAgentRuns(
                    iter(
                        [
                            ingestion_pb.UploadAgentRunsRequest(
                                collection_id=collection.id, agent_runs=[run]
                            )
                        ]
                    )
                )
            pages, token = [], ""
            while True:
                page = await stub.ListAgentRuns(
                    ingestion_pb.ListAgentRunsRequest(
                        collection_id=collection.id, page_size=1000, page_token=token
                    )
                )
                pages.append([stored.agent_run.id for stored in page.agent_runs])
                token = page.next_page_token
                if not token:
                    break
    finally:
        await server.shutdown(grace_seconds=1)
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [run_id for p in pages for run_id in p] == [f"run-{i}" for i in range(10)]
