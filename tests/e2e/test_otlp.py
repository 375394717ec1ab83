"""The OTLP receiver (issue 26) on a live server, both engines: the OpenTelemetry SDK's own gRPC
exporter sending an agent's trace to the server's port, the run growing as spans come and
finishing once quiet after its root; retried exports, out-of-order batches, two processes of one
trace, a span over the limit (partial success), and keys."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingest_grpc
from agentrun.v1 import orchestrator_service_pb2 as orch_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orch_grpc
from agentrun.v1 import workflow_pb2
from agentrun_server import Server, ServerConfig
from agentrun_server.auth import new_key
from agentrun_server.ingestion import IngestionLimits

from ..otlp import export_request
from ..unit.test_otlp_mapping import EXPECTED, TRACE, _roles, genai_trace, span

QUIET_SECONDS = 0.5


@pytest.fixture
async def served(database: str) -> AsyncIterator[Server]:
    limits = IngestionLimits(otlp_quiet_seconds=QUIET_SECONDS)
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, limits=limits))
    await server.start()
    yield server
    await server.shutdown(grace_seconds=1)


async def _stored(channel: grpc.aio.Channel, run_id: str) -> ingest_pb.StoredAgentRun:
    stub = ingest_grpc.IngestionServiceStub(channel)
    return (await stub.GetAgentRun(ingest_pb.GetAgentRunRequest(agent_run_id=run_id))).agent_run


async def _finished(channel: grpc.aio.Channel, run_id: str) -> ingest_pb.StoredAgentRun:
    deadline = time.monotonic() + 10
    while True:
        stored = await _stored(channel, run_id)
        if stored.state == ingest_pb.AGENT_RUN_STATE_FINISHED:
            return stored
        assert time.monotonic() < deadline, "the trace's run did not finish"
        await asyncio.sleep(0.1)


RUN_ID = "otel-" + TRACE.hex()


async def test_an_agent_traced_with_the_sdk_exporter_becomes_a_run_that_finishes(
    served: Server,
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = f"127.0.0.1:{served.port}"
    user = {"role": "user", "parts": [{"type": "text", "content": "What is the weather in Paris?"}]}
    call = {
        "role": "assistant",
        "parts": [
            {
                "type": "tool_call",
                "id": "call_1",
                "name": "get_weather",
                "arguments": {"city": "Paris"},
            }
        ],
    }
    result = {
        "role": "tool",
        "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy, 14C"}],
    }
    final = {"role": "assistant", "parts": [{"type": "text", "content": "Rainy, 14C."}]}

    def agent() -> str:
        provider = TracerProvider(resource=Resource.create({"service.name": "weather-agent"}))
        exporter = OTLPSpanExporter(endpoint=url, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("invoke_agent weather") as root:
            root.set_attribute("gen_ai.operation.name", "invoke_agent")
            root.set_attribute("gen_ai.agent.name", "weather")
            with tracer.start_as_current_span("chat gpt-4o") as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
                chat.set_attribute("gen_ai.request.model", "gpt-4o")
                chat.set_attribute("gen_ai.input.messages", json.dumps([user]))
                chat.set_attribute("gen_ai.output.messages", json.dumps([call]))
            with tracer.start_as_current_span("execute_tool get_weather") as tool:
                tool.set_attribute("gen_ai.operation.name", "execute_tool")
                tool.set_attribute("gen_ai.tool.call.id", "call_1")
                tool.set_attribute("gen_ai.tool.name", "get_weather")
            with tracer.start_as_current_span("chat gpt-4o") as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
                chat.set_attribute("gen_ai.request.model", "gpt-4o")
                chat.set_attribute("gen_ai.input.messages", json.dumps([user, call, result]))
                chat.set_attribute("gen_ai.output.messages", json.dumps([final]))
            provider.force_flush()
            time.sleep(0.3)  # the run is live while the agent works
            trace_id = root.get_span_context().trace_id
        provider.shutdown()
        return "otel-" + trace_id.to_bytes(16, "big").hex()

    run_id = await asyncio.to_thread(agent)
    async with grpc.aio.insecure_channel(url) as channel:
        stored = await _finished(channel, run_id)
        run = stored.agent_run
        assert [t.key for t in run.transcripts] == ["weather"]
        assert [r for r, _ in _roles(run.transcripts[0])] == [
            "user",
            "assistant",
            "tool",
            "assistant",
        ]
        assert run.transcripts[0].messages[3].text == "Rainy, 14C."
        assert run.metadata.fields["service_name"].value.string_value == "weather-agent"
        assert stored.event_count >= 2  # appended as the spans came, then finished
        collections = await ingest_grpc.IngestionServiceStub(channel).ListCollections(
            ingest_pb.ListCollectionsRequest()
        )
        assert [c.name for c in collections.collections] == ["weather-agent"]
    assert served.registry.get_sample_value("agentrun_otlp_runs_opened_total") == 1
    assert served.registry.get_sample_value("agentrun_otlp_runs_finished_total") == 1
    assert served.registry.get_sample_value("agentrun_otlp_spans_total", {"result": "stored"}) == 4


async def test_retries_and_out_of_order_batches_store_each_span_once_in_start_order(
    served: Server,
) -> None:
    spans = genai_trace()  # the agent (root), chat, tool, chat
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        otlp = otlp_grpc.TraceServiceStub(channel)
        # The last model call first, then the rest twice (an exporter retrying), the root last.
        await otlp.Export(export_request([spans[3]]))
        for _ in range(2):
            answer = await otlp.Export(export_request([spans[1], spans[2]]))
            assert not answer.HasField("partial_success")
        live = await _stored(channel, RUN_ID)
        assert live.state == ingest_pb.AGENT_RUN_STATE_RUNNING
        assert live.event_count == 2
        await otlp.Export(export_request([spans[0]], service="another-process"))
        finished = await _finished(channel, RUN_ID)
        assert _roles(finished.agent_run.transcripts[0]) == EXPECTED
        assert finished.agent_run.name == "invoke_agent weather"
        # After it finished: a retry of its spans is still a duplicate, new spans are refused.
        again = await otlp.Export(export_request([spans[2]]))
        assert not again.HasField("partial_success")
        late = await otlp.Export(export_request([span(9, "late", {}, parent=1)]))
        assert late.partial_success.rejected_spans == 1
        assert "finished" in late.partial_success.error_message
    assert (
        served.registry.get_sample_value("agentrun_otlp_spans_total", {"result": "duplicate"}) == 3
    )


async def test_the_collection_comes_from_the_header_then_the_resource(served: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        otlp = otlp_grpc.TraceServiceStub(channel)
        request = export_request(genai_trace())
        await otlp.Export(request, metadata=(("x-agentrun-collection", "from-header"),))
        named = export_request([span(1, "root", {})])
        named.resource_spans[0].resource.attributes.add(
            key="agentrun.collection"
        ).value.string_value = "from-resource"
        named.resource_spans[0].scope_spans[0].spans[0].trace_id = bytes(16 * [7])
        await otlp.Export(named)
        stub = ingest_grpc.IngestionServiceStub(channel)
        names = {
            c.name: c.id
            for c in (await stub.ListCollections(ingest_pb.ListCollectionsRequest())).collections
        }
        assert set(names) == {"from-header", "from-resource"}
        assert (await _stored(channel, RUN_ID)).collection_id == names["from-header"]


async def test_a_span_over_the_limit_is_refused_alone_in_the_partial_success(database: str) -> None:
    limits = IngestionLimits(otlp_quiet_seconds=QUIET_SECONDS, max_run_bytes=64 * 1024)
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, limits=limits))
    await server.start()
    try:
        spans = genai_trace()
        spans[2].attributes.add(key="gen_ai.tool.call.result").value.string_value = "x" * 100_000
        broken = span(5, "broken", {})
        broken.span_id = b"\x01"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answer = await otlp_grpc.TraceServiceStub(channel).Export(
                export_request([*spans, broken])
            )
            assert answer.partial_success.rejected_spans == 2
            message = answer.partial_success.error_message
            assert "100,269 bytes, over max_run_bytes=65536" in message
            assert "span 01 of trace" in message and "span_id 8" in message
            stored = await _finished(channel, RUN_ID)
            roles = [r for r, _ in _roles(stored.agent_run.transcripts[0])]
            assert roles == ["system", "user", "assistant", "tool", "assistant"]
        for reason, count in (("too_large", 1), ("malformed", 1)):
            assert (
                server.registry.get_sample_value(
                    "agentrun_otlp_refused_spans_total", {"reason": reason}
                )
                == count
            )
    finally:
        await server.shutdown(grace_seconds=1)


async def test_an_exporter_needs_an_ingest_key_under_auth_keys(database: str) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, auth="keys"))
    await server.start()
    try:
        assert server._storage is not None and server._keys is not None
        tokens = {}
        for name, scopes in (("agent", ["ingest"]), ("reader", ["read"])):
            record, tokens[name] = new_key(name, scopes)
            await server._storage.create_key(record)
        await server._keys.reload()
        url = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(url) as channel:
            otlp = otlp_grpc.TraceServiceStub(channel)
            for token, code in (
                (None, grpc.StatusCode.UNAUTHENTICATED),
                (tokens["reader"], grpc.StatusCode.PERMISSION_DENIED),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    metadata = (("authorization", f"Bearer {token}"),) if token else ()
                    await otlp.Export(export_request(genai_trace()), metadata=metadata)
                assert refused.value.code() == code

        def export(token: str | None) -> tuple[SpanExportResult, str]:
            """One span through the SDK's exporter, sending `token` as its header."""
            provider = TracerProvider()
            finished = InMemorySpanExporter()
            provider.add_span_processor(SimpleSpanProcessor(finished))
            with provider.get_tracer("test").start_as_current_span("keyed") as root:
                trace_id = root.get_span_context().trace_id
            headers = {"authorization": f"Bearer {token}"} if token else None
            exporter = OTLPSpanExporter(endpoint=url, insecure=True, headers=headers, timeout=5)
            try:
                return exporter.export(finished.get_finished_spans()), f"otel-{trace_id:032x}"
            finally:
                exporter.shutdown()

        assert (await asyncio.to_thread(export, None))[0] == SpanExportResult.FAILURE
        result, run_id = await asyncio.to_thread(export, tokens["agent"])
        assert result == SpanExportResult.SUCCESS
        async with grpc.aio.insecure_channel(url) as channel:
            stub = ingest_grpc.IngestionServiceStub(channel)
            stored = await stub.GetAgentRun(
                ingest_pb.GetAgentRunRequest(agent_run_id=run_id),
                metadata=(("authorization", f"Bearer {tokens['reader']}"),),
            )
            assert stored.agent_run.agent_run.name == "keyed"
        async with grpc.aio.insecure_channel(url) as channel:
            answer = await otlp_grpc.TraceServiceStub(channel).Export(
                export_request(genai_trace()),
                metadata=(("authorization", f"Bearer {tokens['agent']}"),),
            )
            assert not answer.HasField("partial_success")
    finally:
        await server.shutdown(grace_seconds=1)


async def test_a_trace_that_never_ends_is_abandoned_like_any_live_run(database: str) -> None:
    limits = IngestionLimits(otlp_quiet_seconds=QUIET_SECONDS, live_run_timeout_seconds=1.0)
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, limits=limits))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await otlp_grpc.TraceServiceStub(channel).Export(export_request(genai_trace()[1:]))
            assert (await _stored(channel, RUN_ID)).state == ingest_pb.AGENT_RUN_STATE_RUNNING
            await asyncio.sleep(1.5)  # no root span, nothing more: the live-run timeout
            stored = await _stored(channel, RUN_ID)
            assert stored.state == ingest_pb.AGENT_RUN_STATE_ABANDONED
            assert len(stored.agent_run.transcripts[0].messages) == 5
    finally:
        await server.shutdown(grace_seconds=1)


async def test_exporters_find_the_receiver_on_the_otlp_port_too(database: str) -> None:
    config = ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, otlp_port=0)
    server = Server(config)
    await server.start()
    try:
        assert server.otlp_port not in (0, server.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.otlp_port}") as channel:
            answer = await otlp_grpc.TraceServiceStub(channel).Export(export_request(genai_trace()))
            assert not answer.HasField("partial_success")
            assert (await _stored(channel, RUN_ID)).agent_run.name == "invoke_agent weather"
    finally:
        await server.shutdown(grace_seconds=1)


async def test_a_finished_trace_enters_its_collection_s_workflow_once(served: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        orchestrator = orch_grpc.OrchestratorServiceStub(channel)
        await orchestrator.ApplyWorkflow(
            orch_pb.ApplyWorkflowRequest(
                workflow=workflow_pb2.Workflow(
                    name="grading", stages=[workflow_pb2.Stage(name="grade")]
                )
            )
        )
        await ingest_grpc.IngestionServiceStub(channel).CreateCollection(
            ingest_pb.CreateCollectionRequest(name="agent", workflow="grading")
        )
        otlp = otlp_grpc.TraceServiceStub(channel)
        await otlp.Export(export_request(genai_trace()[1:]))
        backlog = await orchestrator.GetBacklog(orch_pb.GetBacklogRequest(workflow="grading"))
        assert backlog.stages[0].ready_count == 0  # running: not yet
        await otlp.Export(export_request(genai_trace()[:1]))
        await _finished(channel, RUN_ID)
        tasks = await orchestrator.ListTasks(orch_pb.ListTasksRequest(workflow="grading"))
        assert [t.agent_run_id for t in tasks.tasks] == [RUN_ID]


TRACE_PART = textwrap.dedent(
    """
    import sys, time
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.propagate import extract, inject
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    role, endpoint = sys.argv[1:3]
    provider = TracerProvider(resource=Resource.create({"service.name": f"{role}-process"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer(role)
    if role == "planner":  # starts the trace, hands its context on, ends it after the coder
        with tracer.start_as_current_span("invoke_agent planner") as root:
            root.set_attribute("gen_ai.operation.name", "invoke_agent")
            root.set_attribute("gen_ai.agent.name", "planner")
            carrier = {}
            inject(carrier)
            print(carrier["traceparent"], flush=True)
            sys.stdin.readline()  # the coder has exported its spans
    else:
        context = extract({"traceparent": sys.argv[3]})
        with tracer.start_as_current_span("invoke_agent coder", context=context) as agent:
            agent.set_attribute("gen_ai.operation.name", "invoke_agent")
            agent.set_attribute("gen_ai.agent.name", "coder")
            with tracer.start_as_current_span("chat") as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
                chat.set_attribute("gen_ai.input.messages", '[{"role": "user", "parts": [{"type": "text", "content": "write it"}]}]')
                chat.set_attribute("gen_ai.output.messages", '[{"role": "assistant", "parts": [{"type": "text", "content": "done"}]}]')
    provider.shutdown()
    """
)


def _two_processes(endpoint: str) -> str:
    with subprocess.Popen(
        [sys.executable, "-c", TRACE_PART, "planner", endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as planner:
        assert planner.stdout is not None and planner.stdin is not None
        traceparent = planner.stdout.readline().strip()
        coder = subprocess.run(
            [sys.executable, "-c", TRACE_PART, "coder", endpoint, traceparent],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert coder.returncode == 0, coder.stderr
        planner.stdin.write("go\n")
        planner.stdin.close()
        assert planner.wait(timeout=60) == 0
    return "otel-" + traceparent.split("-")[1]


async def test_two_processes_exporting_one_trace_make_one_run(served: Server) -> None:
    endpoint = f"127.0.0.1:{served.port}"
    run_id = await asyncio.to_thread(_two_processes, endpoint)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stored = await _finished(channel, run_id)
        assert [t.key for t in stored.agent_run.transcripts] == ["coder"]
        assert [m.text for m in stored.agent_run.transcripts[0].messages] == ["write it", "done"]
        assert stored.agent_run.name == "invoke_agent planner"
        collections = await ingest_grpc.IngestionServiceStub(channel).ListCollections(
            ingest_pb.ListCollectionsRequest()
        )
        # The coder's spans came first: the run is in its collection; the planner's joined it.
        by_id = {c.id: c.name for c in collections.collections}
        assert by_id[stored.collection_id] == "coder-process"


async def test_one_export_of_one_trace_from_two_resources_lands_in_one_run(served: Server) -> None:
    spans = genai_trace()
    request = export_request(spans[:2], service="first")
    second = request.resource_spans.add()
    second.resource.attributes.add(key="service.name").value.string_value = "second"
    second.scope_spans.add().spans.extend(spans[2:])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        answer = await otlp_grpc.TraceServiceStub(channel).Export(request)
        assert not answer.HasField("partial_success")
        finished = await _finished(channel, RUN_ID)
        assert _roles(finished.agent_run.transcripts[0]) == EXPECTED
        assert finished.event_count == 2  # the batch, then the finish
    assert served.registry.get_sample_value("agentrun_otlp_spans_total", {"result": "stored"}) == 4
