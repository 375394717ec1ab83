"""The server's memory under upload pressure: many concurrent streams of near-limit messages.

    make bench-pressure     # or: python bench/bench_pressure.py [--streams 100] [--messages 3]

`agentrun serve` (SQLite, default limits unless flags are given after `--`) in a subprocess; this
process opens `--streams` upload streams at once over 4 connections, each sending `--messages`
messages of runs built from a real tau-bench run grown to just under `max_run_bytes`, packed to
just under the server's `max_message_bytes`. A stream turned away (RESOURCE_EXHAUSTED: the
stream caps, or no room under max_pending_bytes) waits as its RetryInfo asks and tries again, as
the SDK's writer does. The server's RSS is sampled every 50 ms; printed: its peak beside the goal
(512 MB), the bytes stored, and how often streams were turned away.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from bench_ingest import TAU_BENCH, rss_bytes

from agentrun import Client, agent_run_to_proto, load_agent_runs
from agentrun._retry import retry_delay_seconds
from agentrun.v1 import agent_run_pb2
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.v1 import ingestion_service_pb2_grpc as pb_grpc
from agentrun_server import IngestionLimits
from processes import machine, start_agentrun, stop  # bench/ is on sys.path when run

MB = 1e6
GOAL_BYTES = 512 * MB
BIG = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


def grown_run(base: agent_run_pb2.AgentRun, size: int) -> agent_run_pb2.AgentRun:
    """`base` with its first transcript's messages repeated until the run is about `size` bytes."""
    run = agent_run_pb2.AgentRun()
    run.CopyFrom(base)
    messages = list(base.transcripts[0].messages)
    step = sum(m.ByteSize() for m in messages) or 1
    while run.ByteSize() + step < size:
        run.transcripts[0].messages.extend(messages)
    return run


async def stream(
    stub: pb_grpc.IngestionServiceStub,
    collection: str,
    messages: list[bytes],
    stream_no: int,
    counts: dict[str, int],
) -> None:
    """One upload stream of `messages` (encoded requests whose run ids are made unique here)."""
    while True:
        call = stub.UploadAgentRuns()
        try:
            for m, body in enumerate(messages):
                request = pb.UploadAgentRunsRequest.FromString(body)
                for r, run in enumerate(request.agent_runs):
                    run.id = f"s{stream_no}-m{m}-r{r}"
                await call.write(request)
            await call.done_writing()
            response = await call
            counts["stored"] += response.accepted_count + response.duplicate_count
            counts["rejected"] += len(response.rejected)
            return
        except asyncio.InvalidStateError:  # refused while the client still wrote
            counts["turned away"] += 1
            await asyncio.sleep(1.0)
        except grpc.aio.AioRpcError as exc:
            # A refusal that races the client's write surfaces as INTERNAL "Internal error from
            # Core" on the client (grpc/grpc#36066): a refusal too.
            if exc.code() not in (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise
            counts["turned away"] += 1
            await asyncio.sleep(retry_delay_seconds(exc) or 1.0)  # type: ignore[arg-type]


async def pressure(
    url: str, collection: str, requests: list[bytes], streams: int
) -> dict[str, int]:
    counts = {"stored": 0, "rejected": 0, "turned away": 0}
    channels = [grpc.aio.insecure_channel(url, BIG) for _ in range(4)]
    stubs = [pb_grpc.IngestionServiceStub(c) for c in channels]
    try:
        await asyncio.gather(
            *(
                stream(stubs[i % len(stubs)], collection, requests, i, counts)
                for i in range(streams)
            )
        )
    finally:
        for channel in channels:
            await channel.close()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100, help="upload streams at once")
    parser.add_argument("--messages", type=int, default=3, help="messages per stream")
    parser.add_argument("serve_args", nargs="*", help="extra `agentrun serve` flags, after --")
    args = parser.parse_args()
    if not TAU_BENCH.exists():
        print(f"skipped: real data not found at {TAU_BENCH} (set AGENTRUN_SHARED_DATA)")
        return 0
    limits = IngestionLimits()
    base = agent_run_to_proto(load_agent_runs(TAU_BENCH)[0])
    run = grown_run(base, int(limits.max_run_bytes * 0.9))
    per_message = max(1, int(limits.max_message_bytes * 0.9) // run.ByteSize())
    body = pb.UploadAgentRunsRequest(collection_id="", agent_runs=[run] * per_message)
    print(
        f"agentrun upload pressure: {args.streams} streams x {args.messages} messages of "
        f"{per_message} runs of {run.ByteSize() / MB:.1f} MB ({body.ByteSize() / MB:.1f} MB "
        f"per message; limits: max_message_bytes {limits.max_message_bytes / MB:.1f} MB, "
        f"max_pending_bytes {limits.max_pending_bytes / MB:.0f} MB); {machine()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_agentrun(Path(tmp) / "pressure.db", *args.serve_args)
        try:
            with Client(url) as client:
                collection = client.create_collection("pressure").collection.id
            body.collection_id = collection
            requests = [body.SerializeToString()] * args.messages
            idle = rss_bytes(server.pid)
            peak = [idle]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.05):
                    peak[0] = max(peak[0], rss_bytes(server.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            counts = asyncio.run(pressure(url, collection, requests, args.streams))
            seconds = time.perf_counter() - started
            done.set()
            sampler.join()
        finally:
            stop(server)
    stored_mb = counts["stored"] * run.ByteSize() / MB
    print(
        f"  stored {counts['stored']:,} runs ({stored_mb:,.0f} MB) in {seconds:.1f} s "
        f"({stored_mb / seconds:,.0f} MB/s); {counts['rejected']} rejected; streams turned away "
        f"and retried {counts['turned away']:,} times"
    )
    verdict = "under" if peak[0] < GOAL_BYTES else "OVER"
    print(
        f"  server RSS: {idle / MB:,.0f} MB idle, peak {peak[0] / MB:,.0f} MB "
        f"({verdict} the {GOAL_BYTES / MB:.0f} MB goal)"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
