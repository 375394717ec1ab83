"""Real instrumentations into the OTLP receiver (issue 26): the `openai` client, instrumented by
`opentelemetry-instrumentation-openai-v2` (content on spans, and in event mode as log records)
and by OpenInference's, drives a two-turn agent against a local fake OpenAI-compatible server
(a tool call, then an answer); the OpenTelemetry SDK's OTLP gRPC exporters send the trace to a
live server. The run's transcript has the question, the tool call, the tool result and the
answer, in order, once each. Each agent runs in its own process (instrumentors patch `openai`
for the whole process)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingest_grpc
from agentrun_server import Server, ServerConfig
from agentrun_server.ingestion import IngestionLimits


class FakeOpenAI(BaseHTTPRequestHandler):
    """`POST /v1/chat/completions`: a call to get_weather first, the answer once the tool's
    result is in the conversation."""

    def do_POST(self) -> None:  # http.server's name
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answered = any(m.get("role") == "tool" for m in request["messages"])
        if answered:
            message: dict[str, Any] = {"role": "assistant", "content": "Rainy, 14C in Paris."}
            finish = "stop"
        else:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            }
            finish = "tool_calls"
        body = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "fake-1",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


AGENT = textwrap.dedent(
    """
    import json, os, sys
    mode, endpoint, base_url = sys.argv[1:4]
    os.environ["OTEL_SEMCONV_STABILITY_OPT_IN"] = "gen_ai_latest_experimental"
    os.environ["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = (
        "EVENT_ONLY" if mode == "openai-v2-events" else "SPAN_ONLY"
    )
    from opentelemetry import trace
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": mode})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    trace.set_tracer_provider(tracer_provider)
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(endpoint=endpoint, insecure=True)))
    set_logger_provider(logger_provider)
    if mode.startswith("openai-v2"):
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
        OpenAIInstrumentor().instrument()
    else:
        from openinference.instrumentation.openai import OpenAIInstrumentor
        OpenAIInstrumentor().instrument()

    import openai
    client = openai.OpenAI(base_url=base_url, api_key="not-used")
    tracer = trace.get_tracer("weather-agent")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "You are a weather agent."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    with tracer.start_as_current_span("invoke_agent weather") as root:
        root.set_attribute("gen_ai.operation.name", "invoke_agent")
        root.set_attribute("gen_ai.agent.name", "weather")
        first = client.chat.completions.create(model="fake-1", messages=messages, tools=tools)
        call = first.choices[0].message.tool_calls[0]
        with tracer.start_as_current_span("execute_tool get_weather") as tool:
            tool.set_attribute("gen_ai.operation.name", "execute_tool")
            tool.set_attribute("gen_ai.tool.name", call.function.name)
            tool.set_attribute("gen_ai.tool.call.id", call.id)
            result = "rainy, 14C"
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        client.chat.completions.create(model="fake-1", messages=messages, tools=tools)
        trace_id = root.get_span_context().trace_id
    tracer_provider.shutdown()
    logger_provider.shutdown()
    print(f"otel-{trace_id:032x}")
    """
)


def _run_agent(mode: str, endpoint: str, base_url: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", AGENT, mode, endpoint, base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _said(message: ingest_pb.StoredAgentRun, i: int) -> tuple[str, str]:
    m = message.agent_run.transcripts[0].messages[i]
    role = m.WhichOneof("role") or ""
    if role == "assistant" and m.assistant.tool_calls:
        call = m.assistant.tool_calls[0]
        arguments = {f.key: f.value.string_value for f in call.arguments.fields}
        return role, f"{call.id} {call.function}({json.dumps(arguments)})"
    if role == "tool":
        return role, f"{m.tool.tool_call_id}: {m.text}"
    return role, m.text


@pytest.mark.parametrize("mode", ["openai-v2-spans", "openai-v2-events", "openinference"])
async def test_an_instrumented_openai_agent_reads_back_as_its_conversation(
    mode: str, fake_openai: str, tmp_path: Any
) -> None:
    limits = IngestionLimits(otlp_quiet_seconds=0.5)
    database = f"sqlite:///{tmp_path / 'agentrun.db'}"
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, limits=limits))
    await server.start()
    try:
        endpoint = f"127.0.0.1:{server.port}"
        run_id = await asyncio.to_thread(_run_agent, mode, endpoint, fake_openai)
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = ingest_grpc.IngestionServiceStub(channel)
            deadline = time.monotonic() + 15
            while True:
                stored = (
                    await stub.GetAgentRun(ingest_pb.GetAgentRunRequest(agent_run_id=run_id))
                ).agent_run
                if stored.state == ingest_pb.AGENT_RUN_STATE_FINISHED:
                    break
                assert time.monotonic() < deadline, "the trace's run did not finish"
                await asyncio.sleep(0.1)
        run = stored.agent_run
        assert [t.key for t in run.transcripts] == ["weather"], run
        said = [_said(stored, i) for i in range(len(run.transcripts[0].messages))]
        assert said == [
            ("system", "You are a weather agent."),
            ("user", "What is the weather in Paris?"),
            ("assistant", 'call_1 get_weather({"city": "Paris"})'),
            ("tool", "call_1: rainy, 14C"),
            ("assistant", "Rainy, 14C in Paris."),
        ]
        assert run.metadata.fields["model"].value.string_value == "fake-1"
        assert run.metadata.fields["input_tokens"].value.int_value == 40
    finally:
        await server.shutdown(grace_seconds=1)
