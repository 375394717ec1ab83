"""Live runs through the SDK: events/s at saturation, append-to-durable latency at a steady rate,
and appends to a 50 MB run beside appends to an empty one.

    make bench-live      # or: python bench/bench_live.py [--runs 1000] [--events 60000]

The server runs in a subprocess on a fresh SQLite file. 1,000 live runs are opened on one
`AgentRunWriter`; real messages (the tau-bench runs of ../shared/data) are appended one per event,
round robin over the runs, as 1,000 agents each taking a step would. Latency is from `append`
returning to the event's acknowledgement (durable on the server).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from agentrun import AgentRunWriter, Client, LiveRun
from agentrun.chat import ChatMessage, UserMessage
from agentrun.importers import load_agent_runs
from processes import machine, percentile, start_agentrun, stop  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("AGENTRUN_SHARED_DATA", ROOT.parent / "shared" / "data"))
TAU_BENCH = DATA / "tau-bench" / "gpt-4o-airline.json"


class Timed:
    """Wraps a writer's event sender to time each event from submit to its ack."""

    def __init__(self, writer: AgentRunWriter) -> None:
        sender = writer._events
        assert sender is not None
        self.sent: dict[tuple[str, int], float] = {}
        self.latencies: list[float] = []
        submit, acked = sender.submit, sender._acked

        def timed_submit(event):  # type: ignore[no-untyped-def]
            self.sent[(event.agent_run_id, event.sequence)] = time.perf_counter()
            submit(event)

        def timed_acked(response):  # type: ignore[no-untyped-def]
            now = time.perf_counter()
            for ack in response.acks:
                started = self.sent.pop((ack.agent_run_id, ack.sequence), None)
                if started is not None:
                    self.latencies.append(now - started)
            acked(response)

        sender.submit = timed_submit  # type: ignore[method-assign]
        sender._acked = timed_acked  # type: ignore[method-assign]


def saturate(
    writer: AgentRunWriter, runs: list[LiveRun], events: int, source: Iterator[ChatMessage]
) -> float:
    """Append `events` messages round robin over `runs` as fast as the writer takes them; return
    the seconds until the last is acknowledged."""
    assert writer._events is not None
    writer._events.flush()
    started = time.perf_counter()
    for i in range(events):
        runs[i % len(runs)].append("main", [next(source)])
    writer._events.flush()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="live runs open at once")
    parser.add_argument("--events", type=int, default=60_000, help="events at saturation")
    parser.add_argument("--rate", type=int, default=1000, help="events/s of the latency phase")
    parser.add_argument("--seconds", type=float, default=10, help="length of the latency phase")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    if not TAU_BENCH.exists():
        print(f"skipped: real data not found at {TAU_BENCH} (set AGENTRUN_SHARED_DATA)")
        return 0
    messages: list[ChatMessage] = [
        m
        for run in load_agent_runs(TAU_BENCH)
        for t in run.transcripts.values()
        for m in t.messages
    ]
    size = sum(len(m.text) for m in messages[:1000]) / 1000
    print(f"{len(messages):,} real messages, about {size:,.0f} characters each")
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_agentrun(Path(tmp) / "live.db")
        try:
            with Client(url) as client:
                collection = client.create_collection("live").collection.id
            writer = AgentRunWriter(collection, server_url=url)
            runs = [writer.live_run(f"live-{i}", name=f"agent {i}") for i in range(args.runs)]
            timed = Timed(writer)
            source = itertools.cycle(messages)
            assert writer._events is not None

            elapsed = saturate(writer, runs, args.events, source)
            print(
                f"saturation: {args.events:,} events over {len(runs):,} runs in {elapsed:.2f} s: "
                f"{args.events / elapsed:,.0f} events/s (goal 20,000)"
            )
            spooled = AgentRunWriter(collection, server_url=url, spool_dir=Path(tmp) / "spool")
            spooled_runs = [spooled.live_run(f"spooled-{i}") for i in range(args.runs)]
            elapsed = saturate(spooled, spooled_runs, args.events, source)
            print(
                f"saturation with spool_dir (each event on disk before append returns): "
                f"{args.events / elapsed:,.0f} events/s"
            )
            for run in spooled_runs:
                run.finish()
            spooled.finish()

            timed.latencies.clear()
            total = int(args.rate * args.seconds)
            begin = time.perf_counter()
            for i in range(total):
                due = begin + i / args.rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                runs[i % len(runs)].append("main", [next(source)])
            writer._events.flush()
            lat = timed.latencies
            print(
                f"steady {args.rate:,} events/s for {args.seconds:g} s: append to durable ack "
                f"p50 {percentile(lat, 0.5) * 1000:.1f} ms, p99 {percentile(lat, 0.99) * 1000:.1f} ms, "
                f"max {max(lat) * 1000:.1f} ms (goal p99 50 ms)"
            )

            big = writer.live_run("big", name="a 50 MB run")
            chunk = UserMessage(content="x" * (1024 * 1024))
            for _ in range(50):
                big.append("main", [chunk])
            writer._events.flush()
            empty = writer.live_run("empty", name="an empty run")
            writer._events.flush()
            for name, run in (("50 MB run", big), ("empty run", empty), ("50 MB run again", big)):
                timed.latencies.clear()
                for _ in range(2000):
                    run.append("main", [next(source)])
                    writer._events.flush()
                print(
                    f"one append at a time to the {name}: median "
                    f"{statistics.median(timed.latencies) * 1000:.2f} ms"
                )
            for run in runs:
                run.finish()
            writer.finish()
        finally:
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
