"""Orchestrator throughput and dispatch latency: no-op tasks through a three-stage workflow.

    make bench-orchestrate      # or: python bench/bench_orchestrate.py [--runs 5000]

The server runs in a subprocess on a fresh SQLite file. Runs (one short message each) are ingested
into a collection bound to a workflow a -> b -> c, so each run is three tasks. Workers speak the
Work protocol directly (asyncio, in this process) and complete every lease at once with the next
pathway, acking in batches as the Runner does: what is measured is the orchestrator, not the stage
functions. Throughput is tasks completed per second from the first lease to the last ack, with 1, 4
and 16 workers of `--credits` credits each.

The "LLM" rows hold many leases at once: a one-stage workflow whose stage function waits
`--held-seconds` (a model call) with `--held-leases` leases held, through the Runner and the Go and
C++ workers, each beside the ideal (leases / seconds) and with the CPU each worker's process spent
per task.

Dispatch latency is measured apart, with one idle subscribed worker: a run is ingested (its task is
ready when the commit creates it) and the time from the task's create_time to the lease arriving
at the worker is recorded, one task at a time. Client and server share this machine's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

import grpc

from agentrun import AgentRun, AgentRunWriter, BaseAgentRunMetadata, Client, Runner, Transcript
from agentrun.chat import UserMessage
from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc
from agentrun.v1 import workflow_pb2
from processes import (
    database,
    machine,
    percentile,
    start_agentrun,
    start_agentrun_with_metrics,
    stop,
)  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent

NEXT = {"a": "next", "b": "next", "c": ""}


def workflow(name: str) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(
        name=name,
        stages=[
            workflow_pb2.Stage(
                name="a", pathways=[workflow_pb2.Pathway(name="next", next_stage="b")]
            ),
            workflow_pb2.Stage(
                name="b", pathways=[workflow_pb2.Pathway(name="next", next_stage="c")]
            ),
            workflow_pb2.Stage(name="c"),
        ],
    )


def tiny_run(i: int, prefix: str) -> AgentRun:
    return AgentRun(
        id=f"{prefix}-{i}",
        transcripts={"t": Transcript(messages=[UserMessage(content=f"task {i}")])},
        metadata=BaseAgentRunMetadata(scores={}),
    )


def ingest(url: str, name: str, runs: int) -> None:
    with Client(url) as client:
        client.apply_workflow(workflow(name))
        collection = client.create_collection(name, workflow=name).collection.id
    writer = AgentRunWriter(collection, server_url=url, flush_interval=0.05)
    writer.log_agent_runs(tiny_run(i, name) for i in range(runs))
    summary = writer.finish()
    assert summary.accepted == runs, summary


async def worker(
    url: str, name: str, credits: int, done: list[int], first_lease: list[float], target: int
) -> None:
    """Complete every lease at once; stop when `done[0]` reaches `target`."""
    async with grpc.aio.insecure_channel(url) as channel:
        call = pb_grpc.OrchestratorServiceStub(channel).Work()
        await call.write(
            pb.WorkRequest(
                subscribe=pb.Subscribe(
                    workflow=name,
                    stages=[pb.StageSubscription(stage=s) for s in NEXT],
                    credits=credits,
                    worker="bench",
                )
            )
        )
        while done[0] < target:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            if response.WhichOneof("kind") == "acks":
                done[0] += sum(1 for ack in response.acks.acks if ack.code == 0)
                continue
            if response.WhichOneof("kind") != "leases":
                continue
            if not first_lease:
                first_lease.append(time.perf_counter())
            await call.write(
                pb.WorkRequest(
                    complete_tasks=pb.CompleteTasks(
                        completions=[
                            pb.TaskCompletion(
                                task_id=lease.task_id,
                                lease_id=lease.lease_id,
                                pathway=NEXT[lease.stage],
                            )
                            for lease in response.leases.leases
                        ]
                    )
                )
            )
        call.cancel()


async def throughput(urls: list[str], name: str, workers: int, credits: int, tasks: int) -> float:
    """Tasks per second of `workers` raw workers, spread over the servers `urls`."""
    done = [0]
    first: list[float] = []
    running = [
        asyncio.create_task(worker(urls[i % len(urls)], name, credits, done, first, tasks))
        for i in range(workers)
    ]
    await asyncio.wait(
        running, return_when=asyncio.FIRST_COMPLETED
    )  # the one that saw the last ack
    elapsed = time.perf_counter() - first[0]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    if done[0] < tasks:  # a stream ended early: the server refused something
        raise RuntimeError(f"workers stopped after {done[0]} of {tasks} tasks")
    return done[0] / elapsed


async def dispatch_latency(
    url: str, name: str, samples: int, upload_url: str | None = None
) -> list[float]:
    """Seconds from each task's creation to its lease reaching an idle worker of `url`; the runs
    are uploaded through `upload_url` (another replica) if given."""
    with Client(url) as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name=name, stages=[workflow_pb2.Stage(name="only")])
        )
        collection = client.create_collection(name, workflow=name).collection.id
    latencies = []
    async with (
        grpc.aio.insecure_channel(url) as channel,
        grpc.aio.insecure_channel(upload_url or url) as uploading,
    ):
        ingestion = ingestion_grpc.IngestionServiceStub(uploading)
        call = pb_grpc.OrchestratorServiceStub(channel).Work()
        await call.write(
            pb.WorkRequest(
                subscribe=pb.Subscribe(
                    workflow=name, stages=[pb.StageSubscription(stage="only")], credits=1
                )
            )
        )
        await call.read()  # subscribed
        from agentrun import agent_run_to_proto

        for i in range(samples):
            run = agent_run_to_proto(tiny_run(i, name))
            upload = ingestion.UploadAgentRuns(
                iter(
                    [
                        ingestion_pb.UploadAgentRunsRequest(
                            collection_id=collection, agent_runs=[run]
                        )
                    ]
                )
            )
            while True:
                response = await call.read()
                if response.WhichOneof("kind") == "leases":
                    break
            received = time.time()
            (lease,) = response.leases.leases
            latencies.append(received - lease.create_time.ToNanoseconds() / 1e9)
            await upload
            await call.write(
                pb.WorkRequest(
                    complete_tasks=pb.CompleteTasks(
                        completions=[
                            pb.TaskCompletion(task_id=lease.task_id, lease_id=lease.lease_id)
                        ]
                    )
                )
            )
            await call.read()  # the ack
            await asyncio.sleep(0.002)  # the worker is idle again before the next task exists
        call.cancel()
    return latencies


def raw_process_rate(url: str, name: str, credits: int, tasks: int) -> float:
    """Tasks per second of one raw protocol worker (`worker` above) in a process of its own, as
    the Runner and the other clients' workers run: the limit the workers are measured against."""
    code = (
        f"import asyncio, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import bench_orchestrate as b; "
        f"print(asyncio.run(b.throughput([{url!r}], {name!r}, 1, {credits}, {tasks})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600
    ).stdout
    return float(out.split()[-1])


def runner_rate(url: str, name: str, runs: int, credits: int | None, sync: bool = False) -> float:
    """Tasks per second through the public Runner in a process of its own: no-op stage
    functions, as a user writes them (async, or sync with `sync`), `credits` leases held and
    worked at once (None: the Runner's defaults); from its start to its exit (empty stages)."""
    code = f"""
import sys, time
from agentrun import AgentRun, Runner
runner = Runner(workflow={name!r}, server_url={url!r})

@runner.stage("a")
{"def" if sync else "async def"} a(run: AgentRun) -> str:
    return "next"

@runner.stage("b")
{"def" if sync else "async def"} b(run: AgentRun) -> str:
    return "next"

@runner.stage("c")
{"def" if sync else "async def"} c(run: AgentRun) -> None:
    return None

started = time.perf_counter()
summary = runner({"" if credits is None else f"task_batch_size={credits}, concurrency={credits}"})
print(sum(summary.completed.values()), time.perf_counter() - started)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600
    ).stdout
    done, elapsed = out.split()[-2:]
    if int(done) != 3 * runs:
        raise RuntimeError(f"the Runner completed {done} of {3 * runs} tasks")
    return int(done) / float(elapsed)


NATIVE_WORKERS = {
    # The clients' own workers, each serving a, b and c with a no-op stage function (the example
    # programs of clients/go and clients/cpp: `make build-go`, `make build-cpp`).
    "Go work.Worker": (
        ROOT / "build" / "go" / "bin" / "worker",
        lambda name, credits, stages="a,b,c", pathways="next,next,": [
            *("-workflow", name, "-stage", stages, "-pathway", pathways),
            *("-credits", str(credits), "-exit-when-empty"),
        ],
    ),
    "C++ agentrun::Worker": (
        ROOT / "build" / "cpp" / "agentrun-worker",
        lambda name, credits, stages="a,b,c", pathways="next,next,": [
            *(name, stages, pathways, "--credits", str(credits), "--exit-when-empty")
        ],
    ),
}


def native_rate(url: str, name: str, runs: int, credits: int, worker: str) -> float | None:
    """Tasks per second through another language's worker, in its own process, from its start
    to its exit (empty stages); None when it is not built."""
    program, arguments = NATIVE_WORKERS[worker]
    if not program.exists():
        return None
    started = time.perf_counter()
    out = subprocess.run(
        [str(program), *arguments(name, credits)],
        env={**os.environ, "AGENTRUN_SERVER": url},
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    elapsed = time.perf_counter() - started
    if f"completed={3 * runs} " not in out:
        raise RuntimeError(f"{worker}: {out.strip()}")
    return 3 * runs / elapsed


def held_workflow(url: str, name: str, runs: int) -> None:
    """A one-stage workflow `name` ("grade") fed `runs` runs."""
    with Client(url) as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name=name, stages=[workflow_pb2.Stage(name="grade")])
        )
        collection = client.create_collection(name, workflow=name).collection.id
    writer = AgentRunWriter(collection, server_url=url, flush_interval=0.05)
    writer.log_agent_runs(tiny_run(i, name) for i in range(runs))
    summary = writer.finish()
    assert summary.accepted == runs, summary


def held_runner(url: str, name: str, runs: int, leases: int, seconds: float) -> tuple[float, float]:
    """(tasks/s, CPU ms per task) of the public Runner whose async stage awaits `seconds` with
    `leases` leases held; CPU is this process's (the server runs in another)."""
    runner = Runner(workflow=name, server_url=url)

    @runner.stage("grade")
    async def grade(run: AgentRun) -> None:
        await asyncio.sleep(seconds)

    cpu, started = time.process_time(), time.perf_counter()
    summary = runner(task_batch_size=leases, concurrency=leases)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    done = sum(summary.completed.values())
    if done != runs:
        raise RuntimeError(f"the Runner completed {done} of {runs} tasks")
    return done / elapsed, cpu * 1000 / done


def held_native(
    url: str, name: str, runs: int, leases: int, seconds: float, worker: str
) -> tuple[float, float] | None:
    """(tasks/s, CPU ms per task) of another language's worker whose stage takes `seconds`, with
    `leases` leases held, in its own process; None when it is not built."""
    program, arguments = NATIVE_WORKERS[worker]
    if not program.exists():
        return None
    extra = (
        ["-work", f"{seconds}s"]
        if worker.startswith("Go")
        else ["--work-ms", f"{seconds * 1000:.0f}"]
    )
    args = [*arguments(name, leases, stages="grade", pathways=""), *extra]
    before = os.times()
    started = time.perf_counter()
    out = subprocess.run(
        [str(program), *args],
        env={**os.environ, "AGENTRUN_SERVER": url},
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    elapsed = time.perf_counter() - started
    after = os.times()
    if f"completed={runs} " not in out:
        raise RuntimeError(f"{worker}: {out.strip()}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return runs / elapsed, cpu * 1000 / runs


def pgqueuer_rate(
    server: str, folder: Path, runs: int, batch_size: int, driver: str = "psycopg"
) -> float | None:
    """PgQueuer's jobs per second (bench/peer_pgqueuer.py, in its own process, on a fresh
    database, with its `driver`); None when it is not installed."""
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return None
    with database(server, folder, f"pgqueuer-{batch_size}-{driver}") as url:
        out = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).parent / "peer_pgqueuer.py"),
                url,
                str(runs),
                str(batch_size),
                driver,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return float(out.split()[-1])


def held(url: str, runs: int, leases: int, seconds: float) -> float:
    """The LLM rows: each worker beside the ideal, `leases / seconds` tasks/s; return the
    Runner's tasks/s."""
    ideal = leases / seconds
    print(
        f"  one stage awaiting {seconds:g} s (an LLM call), {leases:,} leases held,"
        f" {runs:,} tasks; ideal {ideal:,.0f} tasks/s:"
    )
    held_workflow(url, "held-runner", runs)
    measured = {"the public Runner": held_runner(url, "held-runner", runs, leases, seconds)}
    for label in NATIVE_WORKERS:
        name = "held-" + label.split()[0].lower().replace("+", "p")
        if not NATIVE_WORKERS[label][0].exists():
            print(f"    {label}: not built (make build-go / make build-cpp)")
            continue
        held_workflow(url, name, runs)
        measured[label] = held_native(url, name, runs, leases, seconds, label)  # type: ignore[assignment]
    for label, (rate, cpu) in measured.items():
        print(
            f"    {label}: {rate:>6,.0f} tasks/s ({rate / ideal:.2f} of ideal),"
            f" {cpu:.2f} ms CPU per task"
        )
    return measured["the public Runner"][0]


RUNNER_WAITS = """
import json, sys, time
from agentrun import Runner, TaskContext
runner = Runner(workflow=sys.argv[2], server_url=sys.argv[1])
waits = []

@runner.stage("only")
DEF only(task: TaskContext) -> None:
    waits.append(time.time() - task.create_time.timestamp())
    if len(waits) == 1:
        print("first", flush=True)

runner(refresh_every=3600, drain_grace_seconds=1)
print(json.dumps(waits[1:]), flush=True)
"""


def stage_latency(url: str, samples: int, sync: bool = True) -> list[float]:
    """Seconds from each task's creation to its stage function's call in a Runner process (a
    sync function, or an async one, at the Runner's defaults), one task at a time: ready ->
    stage function, as a user's code sees it."""
    name = "latency-runner-" + ("sync" if sync else "async")
    with Client(url) as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name=name, stages=[workflow_pb2.Stage(name="only")])
        )
        collection = client.create_collection(name, workflow=name).collection.id
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUNNER_WAITS.replace("DEF", "def" if sync else "async def"),
            url,
            name,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert runner.stdout is not None
    from agentrun import agent_run_to_proto

    try:
        with grpc.insecure_channel(url) as channel:
            upload = ingestion_grpc.IngestionServiceStub(channel).UploadAgentRuns
            for i in range(samples + 1):  # the first shows the Runner is up; not counted
                run = agent_run_to_proto(tiny_run(i, name))
                upload(
                    iter(
                        [
                            ingestion_pb.UploadAgentRunsRequest(
                                collection_id=collection, agent_runs=[run]
                            )
                        ]
                    )
                )
                if i == 0:
                    assert runner.stdout.readline().strip() == "first"
                time.sleep(0.005)  # the Runner is idle again before the next task exists
        time.sleep(0.5)
    finally:
        runner.terminate()
    out, _ = runner.communicate(timeout=60)
    waits: list[float] = json.loads(out.strip().splitlines()[-1])
    if len(waits) != samples:
        raise RuntimeError(f"the Runner saw {len(waits)} of {samples} tasks")
    return waits


def celery_latency(samples: int) -> list[float] | None:
    """Celery+Redis's waits, the same way (bench/peer_celery.py, its worker in a process of its
    own); None when Celery or a Redis server on 127.0.0.1:6379 is missing."""
    try:
        import celery  # noqa: F401
        import redis

        redis.Redis().ping()
    except Exception:
        return None
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "peer_celery.py"),
            "redis://127.0.0.1:6379/15",
            str(samples),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return [float(line) for line in out.split()]


def held_across(
    db: str | None, folder: Path, processes: int, runs: int, leases: int, seconds: float
) -> float:
    """The LLM row across `processes` Runner processes of `leases` leases each, on a server of
    its own: steady state, from the enqueue of `runs` x `processes` stored runs (the Runners
    subscribed and waiting) to the last task done, beside the ideal `processes x leases /
    seconds`; return its tasks/s."""
    with database(db, folder, "held-across") as url:
        server, address, metrics = start_agentrun_with_metrics(url)
        try:
            return _held_across(address, metrics, processes, runs, leases, seconds)
        finally:
            stop(server)


def _held_across(
    url: str, metrics: str, processes: int, runs: int, leases: int, seconds: float
) -> float:
    name, total = "held-across", runs * processes
    with Client(url) as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name=name, stages=[workflow_pb2.Stage(name="grade")])
        )
        collection = client.create_collection(name).collection.id
    writer = AgentRunWriter(collection, server_url=url, flush_interval=0.05)
    writer.log_agent_runs(tiny_run(i, name) for i in range(total))
    assert writer.finish().accepted == total
    code = f"""
import asyncio
from agentrun import AgentRun, Runner
runner = Runner(workflow={name!r}, server_url={url!r})

@runner.stage("grade")
async def grade(run: AgentRun) -> None:
    await asyncio.sleep({seconds})

runner(task_batch_size={leases}, concurrency={leases}, refresh_every=3600, drain_grace_seconds=1)
"""
    runners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    try:
        with Client(url) as client:
            deadline = time.monotonic() + 60
            while _workers(metrics) < processes:  # every Runner subscribed
                if time.monotonic() > deadline:
                    raise RuntimeError("the Runners did not all subscribe within 60 s")
                time.sleep(0.1)
            started = time.perf_counter()
            client.enqueue_runs(name, [f"{name}-{i}" for i in range(total)])
            ideal = processes * leases / seconds
            while (done := sum(s.done_count for s in client.backlog(name))) < total:
                # A backlog read counts the ready tasks (~3 ms of the server's CPU at 40,000):
                # read often only near the end, so measuring takes little from what it measures.
                time.sleep(min(0.5, max(0.02, (total - done) / ideal / 4)))
            elapsed = time.perf_counter() - started
    finally:
        for runner in runners:
            runner.terminate()
        for runner in runners:
            runner.wait(timeout=60)
    rate = total / elapsed
    print(
        f"    {processes} Runner processes x {leases:,} leases ({total:,} tasks, from the"
        f" enqueue): {rate:>6,.0f} tasks/s ({rate / ideal:.2f} of the ideal {ideal:,.0f})"
    )
    return rate


def goals(
    args: argparse.Namespace, rates: dict[str, float], raw: float, p99s: dict[str, float]
) -> None:
    """This run's figures beside issue 29's goals, which are SQLite's (PostgreSQL's is the
    PgQueuer comparison, printed with its rows)."""
    print("\n  issue 29's goals, this run:")
    print(f"    Runner async / raw worker: {rates['runner'] / raw:.2f} (>= 0.6)")
    print(f"    Runner sync / raw worker:  {rates['runner sync'] / raw:.2f} (>= 0.4)")
    if "held" in rates and (args.held_leases, args.held_seconds) == (1_000, 1.0):
        print(f"    1 s stage, 1,000 leases:   {rates['held']:,.0f} tasks/s (>= 950)")
        if args.held_runners == 5:
            print(f"    5 Runners x 1,000 leases:  {rates['held across']:,.0f} tasks/s (>= 4,500)")
    if "celery" in p99s:
        print(
            f"    ready -> stage p99:        Runner sync {p99s['sync']:.2f} / async"
            f" {p99s['async']:.2f} ms, Celery {p99s['celery']:.2f} ms (<= Celery)"
        )


def _workers(metrics: str) -> int:
    """Work streams open on the server (its agentrun_workers_connected gauge)."""
    with urlopen(metrics) as page:
        for line in page.read().decode().splitlines():
            if line.startswith("agentrun_workers_connected "):
                return int(float(line.split()[1]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5_000, help="runs per worker count (x3 tasks)")
    parser.add_argument("--credits", type=int, default=64, help="credits per worker")
    parser.add_argument(
        "--runner-credits", type=int, default=256, help="the async Runner's task_batch_size"
    )
    parser.add_argument(
        "--held-runners", type=int, default=5, help="Runner processes of the LLM row across them"
    )
    parser.add_argument("--samples", type=int, default=500, help="dispatch latency samples")
    parser.add_argument("--workers", default="1,4,16", help="worker counts to measure")
    parser.add_argument(
        "--held-runs", type=int, default=8_000, help="runs of the LLM rows (0: skip them)"
    )
    parser.add_argument("--held-leases", type=int, default=1_000, help="leases held, LLM rows")
    parser.add_argument(
        "--held-seconds", type=float, default=1.0, help="each LLM stage call's wait, seconds"
    )
    parser.add_argument(
        "--db",
        default=os.environ.get("DB"),
        help="PostgreSQL server (postgresql://USER@HOST:PORT/DBNAME; fresh databases are made on"
        " it), to measure there beside PgQueuer and with two replicas [env DB; default: SQLite]",
    )
    parser.add_argument(
        "--pgqueuer-batch-sizes", default="10,64,500", help="PgQueuer batch sizes tried"
    )
    args = parser.parse_args()
    engine = "PostgreSQL" if args.db else "SQLite"
    print(
        f"agentrun orchestrator benchmark: no-op tasks through a -> b -> c on {engine}; {machine()}"
    )
    tasks = 3 * args.runs
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, database(args.db, Path(tmp), "orchestrate") as db:
        server, url = start_agentrun(db)
        try:
            for count in (int(n) for n in args.workers.split(",")):
                name = f"bench-{count}"
                ingest(url, name, args.runs)
                rate = asyncio.run(throughput([url], name, count, args.credits, tasks))
                rates[f"{count} raw"] = rate
                print(
                    f"  {count:>2} workers x {args.credits} credits: {rate:>8,.0f} tasks/s"
                    f"  ({tasks:,} tasks)"
                )
            # Each worker below in a process of its own, beside the raw protocol worker so run.
            ingest(url, "raw-process", args.runs)
            raw = raw_process_rate(url, "raw-process", args.credits, tasks)
            workers = {f"raw protocol worker, own process, {args.credits} credits": raw}
            ingest(url, "runner", args.runs)
            rates["runner"] = runner_rate(url, "runner", args.runs, args.runner_credits)
            workers[f"the public Runner, async stages, {args.runner_credits} credits"] = rates[
                "runner"
            ]
            ingest(url, "runner-sync", args.runs)
            rates["runner sync"] = runner_rate(url, "runner-sync", args.runs, None, sync=True)
            workers["the public Runner, sync stages, its defaults"] = rates["runner sync"]
            for label in NATIVE_WORKERS:
                name = "native-" + label.split()[0].lower().replace("+", "p")
                ingest(url, name, args.runs)
                rate = native_rate(url, name, args.runs, args.credits, label)
                if rate is None:
                    print(f"  {label}: not built (make build-go / make build-cpp)")
                    continue
                workers[f"{label}, {args.credits} credits"] = rate
            for label, rate in workers.items():
                print(
                    f"  {label}: {rate:>8,.0f} tasks/s ({rate / raw:.2f} of the raw worker)"
                    f"  ({tasks:,} tasks)"
                )
            if args.held_runs:
                rates["held"] = held(url, args.held_runs, args.held_leases, args.held_seconds)
                rates["held across"] = held_across(
                    args.db,
                    Path(tmp),
                    args.held_runners,
                    args.held_runs,
                    args.held_leases,
                    args.held_seconds,
                )
            latencies = asyncio.run(dispatch_latency(url, "latency", args.samples))
            waits = stage_latency(url, args.samples)
            async_waits = stage_latency(url, args.samples, sync=False)
        finally:
            stop(server)
        ms = sorted(latency * 1000 for latency in latencies)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(
            f"  dispatch latency, ready -> lease at an idle worker ({len(ms)} tasks):"
            f" p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
        )
        peer = celery_latency(args.samples)
        p99s: dict[str, float] = {}
        for key, label, seconds in (
            ("sync", "the public Runner (sync function, its defaults)", waits),
            ("async", "the public Runner (async function, its defaults)", async_waits),
            ("celery", "Celery 5.7 + Redis (solo worker, prefetch 1)", peer),
        ):
            if seconds is None:
                print(f"  {label}: skipped (make install-bench; a Redis server on :6379)")
                continue
            ms = sorted(wait * 1000 for wait in seconds)
            p99s[key] = percentile(ms, 0.99)
            print(
                f"  ready -> stage function, {label} ({len(ms)} tasks): p50"
                f" {statistics.median(ms):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms,"
                f" max {ms[-1]:.2f} ms"
            )
        if not args.db:
            goals(args, rates, raw, p99s)
            return 0
        with database(args.db, Path(tmp), "replicas") as shared:
            first, first_url = start_agentrun(shared)
            second, second_url = start_agentrun(shared)
            try:
                ingest(first_url, "replicas", args.runs)
                count = max(int(n) for n in args.workers.split(","))
                rate = asyncio.run(
                    throughput([first_url, second_url], "replicas", count, args.credits, tasks)
                )
                across = asyncio.run(
                    dispatch_latency(first_url, "across", args.samples, upload_url=second_url)
                )
            finally:
                stop(first)
                stop(second)
        best_one = max(v for k, v in rates.items() if k.endswith("raw"))
        print(
            f"  two replicas, {count} workers split over them: {rate:>8,.0f} tasks/s"
            f"  ({rate / best_one:.2f}x one replica's best)"
        )
        ms = sorted(latency * 1000 for latency in across)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(
            f"  dispatch latency across replicas, run stored through B -> lease at A's idle"
            f" worker ({len(ms)} tasks): p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms,"
            f" max {ms[-1]:.2f} ms"
        )
        # PgQueuer's faster driver is asyncpg: each batch size with each driver.
        peer = {
            (size, driver): pgqueuer_rate(args.db, Path(tmp), args.runs, size, driver)
            for size in (int(n) for n in args.pgqueuer_batch_sizes.split(","))
            for driver in ("psycopg", "asyncpg")
        }
        if None in peer.values():
            print("  PgQueuer: skipped (make install-bench)")
            return 0
        for (size, driver), value in peer.items():
            print(
                f"  PgQueuer, {driver}, batch size {size:>4}: {value:>8,.0f} jobs/s"
                f"  ({tasks:,} jobs)"
            )
        best = max(v for v in peer.values() if v is not None)
        print(
            f"  agentrun / PgQueuer's best: raw workers {best_one / best:.1f}x,"
            f" the public Runner {rates['runner'] / best:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
