"""The console's way to the server's own services: a gRPC channel to a private Unix socket of
the same server, each call carrying the signed-in key. Every read and action of the console so
passes through the interceptors and servicers any client meets (scopes, collection and workflow
limits, checks, audit lines): the console holds no second copy of a rule."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from agentrun.v1 import (
    ingestion_service_pb2 as ingest,
)
from agentrun.v1 import (
    ingestion_service_pb2_grpc,
    orchestrator_service_pb2_grpc,
)
from agentrun.v1 import (
    orchestrator_service_pb2 as orch,
)

# The HTTP status a page answers for each gRPC status its call ended with.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

CALL_TIMEOUT_SECONDS = 30.0


class CallFailed(Exception):
    """A call the console made was answered with an error status: `http_status` for the page,
    `message` as the server said it (it names the field and the limit)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = HTTP_STATUS.get(code, 500)


class Calls:
    """The stubs of the server's ingestion and orchestrator services over `target`
    ("unix:PATH"), called with the caller's API key (None: no credentials)."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", -1)]
        )
        self._ingest = ingestion_service_pb2_grpc.IngestionServiceStub(self._channel)
        self._orch = orchestrator_service_pb2_grpc.OrchestratorServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    @staticmethod
    def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def _unary(self, method: Any, request: Any, token: str | None) -> Any:
        try:
            return await method(
                request, metadata=self._metadata(token), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code(), exc.details() or exc.code().name) from None

    async def list_collections(self, token: str | None) -> ingest.ListCollectionsResponse:
        return await self._unary(  # type: ignore[no-any-return]
            self._ingest.ListCollections, ingest.ListCollectionsRequest(), token
        )

    async def get_collection(
        self, token: str | None, *, name: str = "", id: str = ""
    ) -> ingest.Collection:
        request = (
            ingest.GetCollectionRequest(id=id) if id else ingest.GetCollectionRequest(name=name)
        )
        response = await self._unary(self._ingest.GetCollection, request, token)
        return response.collection  # type: ignore[no-any-return]

    async def list_runs(
        self, token: str | None, request: ingest.ListAgentRunsRequest
    ) -> ingest.ListAgentRunsResponse:
        return await self._unary(self._ingest.ListAgentRuns, request, token)  # type: ignore[no-any-return]

    async def get_run(
        self, token: str | None, run_id: str, view: int = ingest.AGENT_RUN_VIEW_FULL
    ) -> ingest.StoredAgentRun:
        request = ingest.GetAgentRunRequest(agent_run_id=run_id, view=view)  # type: ignore[arg-type]
        response = await self._unary(self._ingest.GetAgentRun, request, token)
        return response.agent_run  # type: ignore[no-any-return]

    async def watch_run(
        self, token: str | None, run_id: str, after_sequence: int
    ) -> AsyncGenerator[ingest.WatchAgentRunResponse, None]:
        """The run's events after `after_sequence` as they land, until it finishes.

        Raises:
            CallFailed: the watch was refused or broke off.
        """
        request = ingest.WatchAgentRunRequest(agent_run_id=run_id, after_sequence=after_sequence)
        call = self._ingest.WatchAgentRun(request, metadata=self._metadata(token))
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code(), exc.details() or exc.code().name) from None
        finally:
            call.cancel()

    async def list_workflows(self, token: str | None) -> orch.ListWorkflowsResponse:
        return await self._unary(  # type: ignore[no-any-return]
            self._orch.ListWorkflows, orch.ListWorkflowsRequest(), token
        )

    async def get_workflow(self, token: str | None, name: str) -> orch.GetWorkflowResponse:
        request = orch.GetWorkflowRequest(name=name)
        return await self._unary(self._orch.GetWorkflow, request, token)  # type: ignore[no-any-return]

    async def backlog(self, token: str | None, workflow: str) -> orch.GetBacklogResponse:
        request = orch.GetBacklogRequest(workflow=workflow)
        return await self._unary(self._orch.GetBacklog, request, token)  # type: ignore[no-any-return]

    async def list_tasks(
        self, token: str | None, request: orch.ListTasksRequest
    ) -> orch.ListTasksResponse:
        return await self._unary(self._orch.ListTasks, request, token)  # type: ignore[no-any-return]

    async def get_task(self, token: str | None, task_id: str) -> Any:
        request = orch.GetTaskRequest(task_id=task_id)
        response = await self._unary(self._orch.GetTask, request, token)
        return response.task

    async def redrive(
        self, token: str | None, workflow: str, stage: str, task_ids: list[str]
    ) -> int:
        request = orch.RedriveTasksRequest(workflow=workflow, stage=stage, task_ids=task_ids)
        response = await self._unary(self._orch.RedriveTasks, request, token)
        return int(response.redriven_count)

    async def cancel(
        self, token: str | None, workflow: str, stage: str, task_ids: list[str]
    ) -> int:
        request = orch.CancelTasksRequest(workflow=workflow, stage=stage, task_ids=task_ids)
        response = await self._unary(self._orch.CancelTasks, request, token)
        return int(response.cancelled_count)
