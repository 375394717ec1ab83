"""The SDK behind a gateway: every call carries the API key, through a real proxy to a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentrun import AgentRun, BaseAgentRunMetadata, Client, Runner, Transcript, init
from agentrun.chat import UserMessage
from agentrun.v1 import ingestion_service_pb2, orchestrator_service_pb2, workflow_pb2
from agentrun_server import Server

SERVICES = [
    service
    for module in (ingestion_service_pb2, orchestrator_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
]


class Gateway:
    """A gRPC proxy that records each call's method and `authorization` header, then forwards the
    call's bytes upstream unchanged: what an API gateway in front of agentrun does."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.calls: list[tuple[str, str | None]] = []

    def _record(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        headers = dict(context.invocation_metadata() or ())
        self.calls.append((method.rsplit("/", 1)[1], headers.get("authorization")))

    def _handler(self, channel: grpc.aio.Channel, method: str, kind: str) -> grpc.RpcMethodHandler:
        async def unary_unary(request: bytes, context: Any) -> bytes:
            self._record(method, context)
            return await channel.unary_unary(method)(request)  # type: ignore[no-any-return]

        async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
            self._record(method, context)
            return await channel.stream_unary(method)(requests)  # type: ignore[no-any-return]

        async def unary_stream(request: bytes, context: Any) -> Any:
            self._record(method, context)
            async for response in channel.unary_stream(method)(request):
                yield response

        async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> Any:
            self._record(method, context)
            async for response in channel.stream_stream(method)(requests):
                yield response

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(locals()[kind])  # type: ignore[no-any-return]

    async def start(self) -> tuple[grpc.aio.Server, grpc.aio.Channel, int]:
        channel = grpc.aio.insecure_channel(self.upstream)
        handlers = []
        for service in SERVICES:
            methods = {}
            for m in service.methods:
                kind = (
                    ("stream" if m.client_streaming else "unary")
                    + "_"
                    + ("stream" if m.server_streaming else "unary")
                )
                methods[m.name] = self._handler(channel, f"/{service.full_name}/{m.name}", kind)
            handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(handlers)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, channel, port


def work_through_the_gateway(url: str) -> tuple[int, int]:
    with Client(url, api_key="k-123") as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name="w", stages=[workflow_pb2.Stage(name="s")])
        )
    writer = init("c", server_url=url, api_key="k-123", workflow="w")
    writer.log_agent_runs(
        AgentRun(
            id=f"r{i}",
            transcripts={"t": Transcript(messages=[UserMessage(content="hi")])},
            metadata=BaseAgentRunMetadata(scores={}),
        )
        for i in range(3)
    )
    with writer.live_run() as live:  # enters the workflow at its finish: a fourth task
        live.append("t", [UserMessage(content="step")])
    accepted = writer.finish().accepted
    runner = Runner(workflow="w", server_url=url, api_key="k-123")

    @runner.stage("s")
    def work(run: AgentRun) -> None:
        return None

    return accepted, sum(runner().completed.values())


async def test_every_call_of_client_writer_and_runner_carries_the_api_key(server: Server) -> None:
    gateway = Gateway(f"127.0.0.1:{server.port}")
    proxy, channel, port = await gateway.start()
    try:
        accepted, completed = await asyncio.to_thread(work_through_the_gateway, f"127.0.0.1:{port}")
    finally:
        await proxy.stop(0)
        await channel.close()
    assert (accepted, completed) == (3, 4)
    methods = {method for method, _ in gateway.calls}
    assert {
        "ApplyWorkflow",
        "CreateCollection",
        "UploadAgentRuns",
        "StreamAgentRunEvents",
        "GetWorkflow",
        "Work",
    } <= methods
    assert {key for _, key in gateway.calls} == {"Bearer k-123"}, gateway.calls
