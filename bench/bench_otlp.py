"""The OTLP receiver beside the live-run events path, in one run on one server (SQLite): messages
stored per second each way, and export-to-readable latency at a steady 1,000 spans/s.

    make bench-otlp      # or: python bench/bench_otlp.py [--traces 1000] [--calls 8]

Real messages (the tau-bench runs of ../shared/data). The events path is the SDK's writer, one
message per event over 1,000 live runs, as `bench_live.py` measures it. The OTLP path is what
GenAI instrumentations send: per trace, `--calls` model-call spans, each carrying the whole
conversation so far plus one new message (so a trace of 8 calls carries 36 messages to store 8),
then its root span; batches of 512 spans (the SDK's BatchSpanProcessor default) from 4 exporters
at once. The figure compared is messages carried per second (the issue's measure), and beside it
messages stored (new) per second. An Export is answered once its spans
are durable and readable, so its latency is export to readable.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from agentrun import AgentRunWriter, Client
from agentrun.chat import ChatMessage
from agentrun.importers import load_agent_runs
from processes import machine, percentile, start_agentrun, stop  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("AGENTRUN_SHARED_DATA", ROOT.parent / "shared" / "data"))
TAU_BENCH = DATA / "tau-bench" / "gpt-4o-airline.json"
BATCH = 512
EXPORTERS = 4


def genai(message: ChatMessage) -> dict[str, object]:
    """A message in GenAI's `{role, parts}` form (its text only)."""
    return {"role": message.role, "parts": [{"type": "text", "content": message.text}]}


def trace_spans(trace: int, calls: int, messages: list[dict[str, object]]) -> list[trace_pb2.Span]:
    """A trace: its root, then `calls` model calls, the k-th carrying messages[: k + 1]."""
    trace_id = trace.to_bytes(16, "big")
    base = 1_700_000_000_000_000_000 + trace * 1_000_000_000
    spans = []
    for k in range(calls):
        span = trace_pb2.Span(
            trace_id=trace_id,
            span_id=(k + 2).to_bytes(8, "big"),
            parent_span_id=(1).to_bytes(8, "big"),
            name="chat gpt-4o",
            start_time_unix_nano=base + k * 1000,
            end_time_unix_nano=base + k * 1000 + 500,
        )
        for key, value in (
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.request.model", "gpt-4o"),
            ("gen_ai.input.messages", json.dumps(messages[:k])),
            ("gen_ai.output.messages", json.dumps(messages[k : k + 1])),
        ):
            span.attributes.add(key=key).value.string_value = value
        spans.append(span)
    root = trace_pb2.Span(
        trace_id=trace_id,
        span_id=(1).to_bytes(8, "big"),
        name="invoke_agent",
        start_time_unix_nano=base,
        end_time_unix_nano=base + calls * 1000,
    )
    return [*spans, root]


def request(spans: list[trace_pb2.Span]) -> otlp_pb.ExportTraceServiceRequest:
    made = otlp_pb.ExportTraceServiceRequest()
    resource = made.resource_spans.add()
    resource.resource.attributes.add(key="service.name").value.string_value = "bench-otlp"
    resource.scope_spans.add().spans.extend(spans)
    return made


async def export_all(url: str, requests: list[otlp_pb.ExportTraceServiceRequest]) -> list[float]:
    """Send `requests` from EXPORTERS concurrent exporters; each Export's latency."""
    latencies: list[float] = []
    queue = list(reversed(requests))
    async with grpc.aio.insecure_channel(url) as channel:
        stub = otlp_grpc.TraceServiceStub(channel)

        async def exporter() -> None:
            while queue:
                sent = queue.pop()
                started = time.perf_counter()
                answer = await stub.Export(sent, timeout=60)
                latencies.append(time.perf_counter() - started)
                assert not answer.HasField("partial_success"), answer

        await asyncio.gather(*(exporter() for _ in range(EXPORTERS)))
    return latencies


async def steady(
    url: str, rate: int, seconds: float, traces: list[list[trace_pb2.Span]]
) -> list[float]:
    """Export `rate` spans/s in batches of 10 every 10 ms; each Export's latency."""
    spans = [span for trace in traces for span in trace]
    latencies: list[float] = []
    per_batch = max(1, rate // 100)
    async with grpc.aio.insecure_channel(url) as channel:
        stub = otlp_grpc.TraceServiceStub(channel)
        begin = time.perf_counter()
        pending = []

        async def one(batch: list[trace_pb2.Span]) -> None:
            started = time.perf_counter()
            await stub.Export(request(batch), timeout=60)
            latencies.append(time.perf_counter() - started)

        for i in range(int(seconds * 100)):
            due = begin + i / 100
            pause = due - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            batch = spans[i * per_batch : (i + 1) * per_batch]
            if not batch:
                break
            pending.append(asyncio.create_task(one(batch)))
        await asyncio.gather(*pending)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=1000, help="traces (runs) at saturation")
    parser.add_argument("--calls", type=int, default=8, help="model calls per trace")
    parser.add_argument("--rate", type=int, default=1000, help="spans/s of the latency phase")
    parser.add_argument("--seconds", type=float, default=10, help="length of the latency phase")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    if not TAU_BENCH.exists():
        print(f"skipped: real data not found at {TAU_BENCH} (set AGENTRUN_SHARED_DATA)")
        return 0
    messages = [
        m
        for run in load_agent_runs(TAU_BENCH)
        for t in run.transcripts.values()
        for m in t.messages
    ]
    source = itertools.cycle(messages)
    carried = args.traces * args.calls
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_agentrun(Path(tmp) / "otlp.db")
        try:
            # The events path: one message per event, round robin over as many live runs.
            with Client(url) as client:
                collection = client.create_collection("live").collection.id
            writer = AgentRunWriter(collection, server_url=url)
            runs = [writer.live_run(f"live-{i}") for i in range(args.traces)]
            assert writer._events is not None
            writer._events.flush()
            started = time.perf_counter()
            for i in range(carried):
                runs[i % len(runs)].append("main", [next(source)])
            writer._events.flush()
            events_rate = carried / (time.perf_counter() - started)
            for run in runs:
                run.finish()
            writer.finish()

            # The OTLP path: the same number of new messages, as model-call spans.
            conversation = [genai(next(source)) for _ in range(args.calls)]
            traces = [trace_spans(t + 1, args.calls, conversation) for t in range(args.traces)]
            # Spans of many traces interleaved in each batch, as concurrent agents export them.
            spans = [s for group in itertools.zip_longest(*traces) for s in group if s is not None]
            requests = [request(spans[i : i + BATCH]) for i in range(0, len(spans), BATCH)]
            started = time.perf_counter()
            latencies = asyncio.run(export_all(url, requests))
            elapsed = time.perf_counter() - started
            otlp_rate = carried / elapsed
            # What the spans carried: each call its whole conversation so far, 1 + 2 + ... + calls.
            in_payload = args.traces * args.calls * (args.calls + 1) // 2 / elapsed
            print(
                f"saturation over {args.traces:,} runs: events path {events_rate:,.0f} "
                f"messages/s; OTLP {len(spans) / elapsed:,.0f} spans/s carrying "
                f"{in_payload:,.0f} messages/s: {in_payload / events_rate:.2f}x the events path "
                f"per message carried (goal 0.5x), of which {otlp_rate:,.0f}/s new "
                f"({otlp_rate / events_rate:.2f}x per message stored); Export of {BATCH} spans "
                f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms"
            )
            late = [trace_spans(100_000 + t, args.calls, conversation) for t in range(args.traces)]
            lat = asyncio.run(steady(url, args.rate, args.seconds, late))
            print(
                f"steady {args.rate:,} spans/s for {args.seconds:g} s: export to readable "
                f"p50 {percentile(lat, 0.5) * 1000:.1f} ms, p99 {percentile(lat, 0.99) * 1000:.1f} "
                f"ms, max {max(lat) * 1000:.1f} ms (goal p99 100 ms)"
            )
        finally:
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
