"""Every real run (200 tau-bench, 17 Inspect) as an agent traced with OpenTelemetry sends it
(GenAI spans: a model call per answer, each carrying the conversation before it), exported to a
live server: each reads back equal (`.text`) to the same run uploaded whole, but for the metadata
the receiver adds of its own (trace id, spans, usage) where the run had no such field."""

from __future__ import annotations

import asyncio
import time

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

from agentrun import AgentRun, AgentRunWriter, BaseAgentRunMetadata, Client
from agentrun_server import Server, ServerConfig
from agentrun_server.ingestion import IngestionLimits

from ..otlp import export_request, run_to_spans

RECEIVER_KEYS = {
    "trace_id",
    "span_count",
    "spans",
    "service_name",
    "model",
    "models",
    "provider",
    "input_tokens",
    "output_tokens",
    "errors",
}


def _without_receiver_keys(run: AgentRun, original: AgentRun) -> AgentRun:
    mine = set(type(original.metadata).model_fields) | set(original.metadata.model_extra or {})
    dropped = {k for k in RECEIVER_KEYS if k not in mine}
    fields = run.metadata.model_dump(exclude=dropped)
    return run.model_copy(update={"metadata": BaseAgentRunMetadata.model_validate(fields)})


async def test_every_real_run_sent_as_genai_spans_reads_back_as_uploaded(
    real_runs: list[AgentRun], tmp_path: object
) -> None:
    limits = IngestionLimits(otlp_quiet_seconds=0.5)
    server = Server(
        ServerConfig(
            db=f"sqlite:///{tmp_path}/agentrun.db",
            port=0,
            metrics_port=-1,
            web_port=-1,
            limits=limits,
        )
    )
    await server.start()
    url = f"127.0.0.1:{server.port}"
    try:
        traces = {run.id: (i + 1).to_bytes(16, "big") for i, run in enumerate(real_runs)}
        async with grpc.aio.insecure_channel(url) as channel:
            otlp = otlp_grpc.TraceServiceStub(channel)
            for run in real_runs:
                answer = await otlp.Export(export_request(run_to_spans(run, traces[run.id])))
                assert not answer.HasField("partial_success"), (run.id, answer)

        def whole_and_traced() -> list[tuple[AgentRun, AgentRun, AgentRun]]:
            with Client(url) as client:
                collection = client.create_collection("whole").collection
                with AgentRunWriter(collection.id, server_url=url) as writer:
                    writer.log_agent_runs(real_runs)
                traced = client.get_collection(name="agent").id
                deadline = time.monotonic() + 60
                while client.list_runs(traced, state="running", page_size=1).runs:
                    assert time.monotonic() < deadline, "the traces' runs did not finish"
                    time.sleep(0.2)
                pairs = [
                    (
                        run,
                        client.get_run(run.id, type(run.metadata)),
                        client.get_run(f"otel-{traces[run.id].hex()}"),
                    )
                    for run in real_runs
                ]
                return pairs

        mismatched = []
        for original, uploaded, traced in await asyncio.to_thread(whole_and_traced):
            if _without_receiver_keys(traced, original).text != uploaded.text:
                mismatched.append(original.id)
        assert not mismatched, f"{len(mismatched)} of {len(real_runs)} differ: {mismatched[:5]}"
    finally:
        await server.shutdown(grace_seconds=1)
