"""What authentication and TLS cost on the hot paths: ingestion through the AgentRunWriter and
tasks through the Runner, against a server with `--auth none` (plaintext), one with
`--auth keys` (plaintext, to isolate the key checks) and one with `--auth keys` and TLS, side by
side in one run.

    make bench-auth      # or: python bench/bench_auth.py [--runs 20000] [--tasks 3000] [--rounds 3]

Both servers run in subprocesses on fresh SQLite files; the rounds alternate between them so the
machine's drift falls on both alike. Keys are checked once per call or stream (a hash and a dict
lookup), never per run or task, so the difference is mostly TLS's encryption. The goal (issue 15):
at most 10 % fewer runs/s and tasks/s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    Connection,
    Runner,
    Transcript,
)
from agentrun.chat import AssistantMessage, UserMessage
from agentrun.v1 import workflow_pb2
from processes import machine, start_agentrun, stop  # bench/ is on sys.path when run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.certificates import Authority  # the test suite's CA (cryptography)


def runs(n: int, prefix: str) -> list[AgentRun]:
    """Runs of a user and an assistant turn of about 1 KB each."""
    text = "lorem ipsum dolor sit amet " * 40
    return [
        AgentRun(
            id=f"{prefix}-{i}",
            transcripts={
                "t": Transcript(
                    messages=[UserMessage(content=f"{i} {text}"), AssistantMessage(content=text)]
                )
            },
            metadata=BaseAgentRunMetadata(scores={"reward": float(i % 2)}),
        )
        for i in range(n)
    ]


def ingest_rate(connection: Connection, collection: str, batch: list[AgentRun]) -> float:
    with Client(connection=connection) as client:
        collection_id = client.create_collection(collection).collection.id
    writer = AgentRunWriter(collection_id, connection=connection)
    started = time.perf_counter()
    writer.log_agent_runs(batch)
    summary = writer.finish()
    elapsed = time.perf_counter() - started
    assert summary.accepted == len(batch), summary
    return len(batch) / elapsed


def runner_rate(connection: Connection, name: str, batch: list[AgentRun]) -> float:
    """Tasks per second through the public Runner, no-op stage functions, 32 leases at once."""
    with Client(connection=connection) as client:
        client.apply_workflow(
            workflow_pb2.Workflow(name=name, stages=[workflow_pb2.Stage(name="s")])
        )
        collection_id = client.create_collection(name, workflow=name).collection.id
    writer = AgentRunWriter(collection_id, connection=connection)
    writer.log_agent_runs(batch)
    assert writer.finish().accepted == len(batch)
    runner = Runner(workflow=name, connection=connection)

    @runner.stage("s")
    async def s(run: AgentRun) -> None:
        return None

    started = time.perf_counter()
    summary = runner(task_batch_size=32, concurrency=32)
    elapsed = time.perf_counter() - started
    assert sum(summary.completed.values()) == len(batch), summary
    return len(batch) / elapsed


def admin_key(db: Path) -> str:
    """An admin key made on a new database, as `agentrun keys create --db` makes the first."""
    command = ["keys", "create", "bench", "--scope", "admin", "--db", f"sqlite:///{db}"]
    created = subprocess.run(
        [sys.executable, "-m", "agentrun._cli", *command],
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30_000, help="runs ingested per round")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks run per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ca = Authority(folder / "ca")
        certificate = ca.issue("localhost", server=True)
        plain, plain_url = start_agentrun(folder / "plain.db")
        keyed_token = admin_key(folder / "keyed.db")
        keyed, keyed_url = start_agentrun(folder / "keyed.db", "--auth", "keys")
        token = admin_key(folder / "secured.db")
        secured, secured_url = start_agentrun(
            folder / "secured.db",
            "--auth",
            "keys",
            "--tls-cert",
            str(certificate.cert),
            "--tls-key",
            str(certificate.key),
        )
        port = secured_url.rsplit(":", 1)[1]
        setups = {
            "auth none, plaintext": Connection(plain_url),
            "auth keys, plaintext": Connection(keyed_url, api_key=keyed_token),
            "auth keys, TLS": Connection(
                f"localhost:{port}", api_key=token, tls_ca_file=str(ca.cert)
            ),
        }
        ingest: dict[str, list[float]] = {name: [] for name in setups}
        tasks: dict[str, list[float]] = {name: [] for name in setups}
        try:
            for round_ in range(args.rounds):
                order = list(setups) if round_ % 2 == 0 else list(reversed(setups))
                for n, name in enumerate(order):
                    tag = f"r{round_}-{n}"
                    ingest[name].append(
                        ingest_rate(setups[name], f"ingest-{tag}", runs(args.runs, f"i{tag}"))
                    )
                    tasks[name].append(
                        runner_rate(setups[name], f"work-{tag}", runs(args.tasks, f"w{tag}"))
                    )
        finally:
            stop(plain)
            stop(keyed)
            stop(secured)
    print(f"median (range) of {args.rounds} alternating rounds:")
    print(f"{'':22} {'runs/s (writer)':>24} {'tasks/s (Runner)':>22}   (beside auth none)")
    base = "auth none, plaintext"

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    for name in setups:
        i, t = statistics.median(ingest[name]), statistics.median(tasks[name])
        ratio = (
            ""
            if name == base
            else f"   ({i / statistics.median(ingest[base]):.2f}x, "
            f"{t / statistics.median(tasks[base]):.2f}x)"
        )
        print(f"{name:22} {cell(ingest[name]):>24} {cell(tasks[name]):>22}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
