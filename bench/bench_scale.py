"""What reads cost as history grows: the backlog, a metrics scrape, leasing during a scrape,
paging through runs, and the WAL, at 10k, 100k and 1M runs (and as many done tasks).

    make bench-scale            # or: python bench/bench_scale.py [--scales 10000,100000,1000000]

For each scale, `agentrun serve` (metrics on) starts on a fresh SQLite file. N runs of about 1 KB
are uploaded with the writer (wire-form runs) into a collection bound to a one-stage workflow,
while a worker completes each task as it becomes ready: writes that never pause, as in
production. The WAL's size is sampled throughout. Then, with N runs and N done tasks stored:

- GetBacklog and a /metrics scrape: median and max of repeated calls;
- dispatch latency (a run uploaded -> its task's lease at an idle worker), idle and while another
  thread scrapes /metrics without pause;
- paging through the collection's first 100,000 runs with ListAgentRuns (pages of 1,000);
- one page of 50 runs newest first, as `agentrun runs list` asks: unfiltered, filtered by a score
  half the runs meet (`scores.reward < 0.5`), by a metadata value two runs in 1,000 have
  (`metadata.model = rare`), by both (one in 1,000), and by a pair no run meets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from bench_orchestrate import dispatch_latency  # bench/ is on sys.path when run

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    Transcript,
    agent_run_to_proto,
)
from agentrun.chat import UserMessage
from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc
from agentrun.v1 import workflow_pb2
from processes import database, machine, start_agentrun_with_metrics, stop

PAGE = 1000
PAGED_RUNS = 100_000


def runs(first: int, count: int) -> list[object]:
    """`count` wire-form runs of about 1 KB, numbered from `first`."""
    base = agent_run_to_proto(
        AgentRun(
            transcripts={"t": Transcript(messages=[UserMessage(content="x" * 900)])},
            metadata=BaseAgentRunMetadata(scores={"reward": 1.0}),
        )
    )
    made = []
    for i in range(first, first + count):
        run = type(base)()
        run.CopyFrom(base)
        run.id = f"scale-{i:08d}"
        run.scores["reward"].double_value = i % 4 / 4
        rare = i % 1000 in (4, 7)  # two in 1,000: one with reward 0, one with 0.75
        run.metadata.fields["model"].value.string_value = "rare" if rare else "common"
        made.append(run)
    return made


FILTERED = {
    "no filter": [],
    "reward < 0.5 (half)": ["scores.reward < 0.5"],
    "model = rare (0.2 %)": ["metadata.model = rare"],
    "both (0.1 %)": ["scores.reward < 0.5", "metadata.model = rare"],
    "both, matching none": ["scores.reward > 0.9", "metadata.model = rare"],
}


def filtered_pages(url: str) -> dict[str, tuple[float, float]]:
    """Median and max ms of one page of 50 runs, newest first, under each of FILTERED."""
    with Client(url) as client:
        collection = client.get_collection(name="scale").id
        return {
            label: timed(lambda w=where: client.list_runs(collection, where=w, page_size=50), 20)
            for label, where in FILTERED.items()
        }


async def complete_all(url: str, total: int) -> None:
    """A worker completing every task of workflow `scale` as it becomes ready."""
    async with grpc.aio.insecure_channel(url) as channel:
        call = pb_grpc.OrchestratorServiceStub(channel).Work()
        await call.write(
            pb.WorkRequest(
                subscribe=pb.Subscribe(
                    workflow="scale", stages=[pb.StageSubscription(stage="only")], credits=256
                )
            )
        )
        done = 0
        while done < total:
            response = await call.read()
            kind = response.WhichOneof("kind")
            if kind == "acks":
                done += sum(1 for ack in response.acks.acks if ack.code == 0)
            elif kind == "leases":
                await call.write(
                    pb.WorkRequest(
                        complete_tasks=pb.CompleteTasks(
                            completions=[
                                pb.TaskCompletion(task_id=lease.task_id, lease_id=lease.lease_id)
                                for lease in response.leases.leases
                            ]
                        )
                    )
                )
        call.cancel()


def fill(url: str, db: Path | None, count: int) -> tuple[float, int]:
    """Upload `count` runs while a worker completes their tasks; return the seconds it took and
    the largest size of the WAL of SQLite file `db` (0 for PostgreSQL)."""
    with Client(url) as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name="scale", stages=[workflow_pb2.Stage(name="only")])
        )
        collection = client.create_collection("scale", workflow="scale").collection.id
    wal = Path(f"{db}-wal") if db is not None else None
    largest = [0]
    stop_sampling = threading.Event()

    def sample() -> None:
        while wal is not None and not stop_sampling.wait(0.2):
            with contextlib.suppress(OSError):
                largest[0] = max(largest[0], wal.stat().st_size)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    worker = threading.Thread(target=lambda: asyncio.run(complete_all(url, count)), daemon=True)
    worker.start()
    writer = AgentRunWriter(collection, server_url=url, batch_size=1000)
    for start in range(0, count, 50_000):
        writer.log_agent_runs(runs(start, min(50_000, count - start)))
    summary = writer.finish()
    assert summary.accepted == count, summary
    worker.join()
    elapsed = time.perf_counter() - started
    stop_sampling.set()
    sampler.join()
    return elapsed, largest[0]


def timed(call: object, times: int) -> tuple[float, float]:
    """Median and max milliseconds of `times` calls of `call()`."""
    ms = []
    for _ in range(times):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        ms.append((time.perf_counter() - started) * 1000)
    return statistics.median(ms), max(ms)


def scrape(metrics_url: str) -> None:
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        body = response.read()
    assert b"agentrun_stage_tasks" in body, "the scrape lacks the backlog"


def page_through(url: str, limit: int) -> tuple[int, float]:
    """Runs read and seconds taken, paging through the collection up to `limit` runs."""
    with grpc.insecure_channel(url) as channel, Client(url) as client:
        collection = client.get_collection(name="scale").id
        stub = ingestion_grpc.IngestionServiceStub(channel)
        read, token = 0, ""
        started = time.perf_counter()
        while read < limit:
            page = stub.ListAgentRuns(
                ingestion_pb.ListAgentRunsRequest(
                    collection_id=collection, page_size=PAGE, page_token=token
                )
            )
            read += len(page.agent_runs)
            token = page.next_page_token
            if not token:
                break
        return read, time.perf_counter() - started


def latency(url: str, name: str, samples: int) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in asyncio.run(dispatch_latency(url, name, samples)))
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))]


def measure(count: int, samples: int, server_db: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, database(server_db, Path(tmp), "scale") as db:
        server, url, metrics_url = start_agentrun_with_metrics(db)
        sqlite_file = Path(db.removeprefix("sqlite:///")) if db.startswith("sqlite") else None
        try:
            seconds, wal_peak = fill(url, sqlite_file, count)
            with Client(url) as client:
                backlog = timed(lambda: client.backlog(), 20)
            scraped = timed(lambda: scrape(metrics_url), 10)
            idle = latency(url, "idle", samples)
            scraping = threading.Event()

            def scrape_without_pause() -> None:
                while not scraping.is_set():
                    scrape(metrics_url)

            scraper = threading.Thread(target=scrape_without_pause, daemon=True)
            scraper.start()
            try:
                busy = latency(url, "busy", samples)
            finally:
                scraping.set()
                scraper.join()
            paged, paging_seconds = page_through(url, PAGED_RUNS)
            pages = filtered_pages(url)
            if sqlite_file is not None:
                size = sqlite_file.stat().st_size
                wal_now = Path(str(sqlite_file) + "-wal").stat().st_size
        finally:
            stop(server)
    print(
        f"{count:>9,} runs and done tasks (filled in {seconds:.0f} s, {count / seconds:,.0f} runs/s)"
    )
    print(f"    GetBacklog          median {backlog[0]:7.1f} ms   max {backlog[1]:7.1f} ms")
    print(f"    /metrics scrape     median {scraped[0]:7.1f} ms   max {scraped[1]:7.1f} ms")
    print(f"    lease latency idle          p50 {idle[0]:6.2f} ms   p99 {idle[1]:6.2f} ms")
    print(f"    lease latency, scraping     p50 {busy[0]:6.2f} ms   p99 {busy[1]:6.2f} ms")
    print(
        f"    ListAgentRuns       {paged:,} runs in {paging_seconds:.1f} s"
        f" ({paging_seconds / max(1, paged // PAGE) * 1000:.1f} ms a page of {PAGE})"
    )
    for label, (median, worst) in pages.items():
        print(
            f"    runs list, 50 newest, {label:<22} median {median:6.1f} ms   max {worst:6.1f} ms"
        )
    if sqlite_file is not None:
        print(
            f"    database {size / 1e6:,.0f} MB; WAL peak {wal_peak / 1e6:,.0f} MB while filling,"
            f" {wal_now / 1e6:,.1f} MB at the end"
        )
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="10000,100000,1000000", help="run counts to measure")
    parser.add_argument("--samples", type=int, default=200, help="dispatch latency samples")
    parser.add_argument(
        "--db",
        default=os.environ.get("DB"),
        help="PostgreSQL server (postgresql://USER@HOST:PORT/DBNAME; a fresh database is made"
        " on it per scale) [env DB; default: SQLite files]",
    )
    args = parser.parse_args()
    engine = "PostgreSQL" if args.db else "SQLite"
    print(f"agentrun at scale, {engine}; {machine()}; pid {os.getpid()}")
    for count in (int(n) for n in args.scales.split(",")):
        measure(count, args.samples, args.db)
    return 0


if __name__ == "__main__":
    sys.exit(main())
