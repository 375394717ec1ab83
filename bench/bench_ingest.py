"""Ingestion throughput on real runs: writer -> gRPC server -> committed in SQLite.

    make bench-ingest           # or: python bench/bench_ingest.py [--runs 65000] [--http-runs 10000]

The real tau-bench runs (../shared/data) are repeated under fresh ids up to `--runs` (at least 1 GB
of encoded runs by default). Measured in one run, each on a fresh SQLite file:

1. raw insert: the same encoded runs inserted with `executemany`, 1,000 per transaction, into the
   server's own schema, in this process: the storage limit;
2. gRPC, wire-form runs: `AgentRunWriter.log_agent_runs` of `agentrun.v1.AgentRun` messages to
   `agentrun serve` in a subprocess, until `finish()` returns with every run acknowledged; the
   server's RSS is sampled throughout;
3. gRPC, model runs: the same path from pydantic `AgentRun` models (the writer encodes them);
4. HTTP+JSON: Docent-style batch POSTs of the same models (bench/http_baseline.py), once as
   Docent's writer sends them (`model_dump` renders `.text` into every run) and once without.

Paths 2-4 include the client's encoding; the client and the server each have a core of this
machine's two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agentrun import AgentRun, AgentRunWriter, Client, agent_run_to_proto, load_agent_runs
from agentrun.v1 import agent_run_pb2
from processes import (  # bench/ is on sys.path when run
    database,
    machine,
    start,
    start_agentrun,
    stop,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("AGENTRUN_SHARED_DATA", ROOT.parent / "shared" / "data"))
TAU_BENCH = DATA / "tau-bench" / "gpt-4o-airline.json"
MB = 1e6


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def line(name: str, runs: int, size: int, seconds: float, reference: float | None = None) -> float:
    rate = runs / seconds
    ratio = f"  {rate / reference:5.2f}x" if reference else ""
    print(
        f"  {name:<34} {rate:>9,.0f} runs/s {size / MB / seconds:>7.1f} MB/s"
        f"  ({runs:,} runs, {size / MB:,.0f} MB, {seconds:.1f} s){ratio}"
    )
    return rate


def raw_insert(db: Path, encoded: list[tuple[str, bytes]]) -> float:
    """Seconds to insert every run, 1,000 per transaction, into the server's schema."""
    subprocess.run(  # the server creates its schema; stop it at once
        [
            sys.executable,
            "-c",
            "import asyncio, agentrun_server.storage as s;"
            f"asyncio.run(s.open_storage('sqlite:///{db}'))",
        ],
        check=True,
    )
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("INSERT INTO collections (id, name, created_at) VALUES ('c', 'c', 0)")
    started = time.perf_counter()
    now = time.time()
    for i in range(0, len(encoded), 1000):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data)"
            " VALUES (?, 'c', NULL, ?, ?, ?)",
            [(run_id, len(data), now, data) for run_id, data in encoded[i : i + 1000]],
        )
        conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    return seconds


def raw_insert_postgres(url: str, encoded: list[tuple[str, bytes]], copy: bool) -> float:
    """Seconds to insert every run with psycopg, 1,000 per transaction, into the server's schema
    (`executemany` of binary parameters, or COPY in binary)."""
    import psycopg

    from agentrun_server.storage.postgres import migrate

    asyncio.run(migrate(url))
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO collections (id, name, created_at) VALUES ('c', 'c', 0)")
        conn.commit()
        started = time.perf_counter()
        now = time.time()
        for i in range(0, len(encoded), 1000):
            rows = [(run_id, "c", len(data), now, data) for run_id, data in encoded[i : i + 1000]]
            with conn.transaction():
                if copy:
                    with conn.cursor().copy(
                        "COPY agent_runs (id, collection_id, size_bytes, ingested_at, data) "
                        "FROM STDIN (FORMAT BINARY)"
                    ) as writing:
                        writing.set_types(["text", "text", "int4", "float8", "bytea"])
                        for row in rows:
                            writing.write_row(row)
                else:
                    conn.cursor().executemany(
                        "INSERT INTO agent_runs (id, collection_id, size_bytes, ingested_at, data)"
                        " VALUES (%s, %s, %s, %s, %b)",
                        rows,
                    )
        return time.perf_counter() - started


def postgres(
    server: str,
    folder: Path,
    encoded: list[tuple[str, bytes]],
    size: int,
    runs: int,
    proto: Callable[[int], agent_run_pb2.AgentRun],
) -> None:
    """The PostgreSQL rows: raw psycopg inserts beside the writer through the server."""
    with database(server, folder, "raw-many") as url:
        many = line(
            "raw psycopg executemany, 1,000/tx",
            len(encoded),
            size,
            raw_insert_postgres(url, encoded, copy=False),
        )
    with database(server, folder, "raw-copy") as url:
        copied = line(
            "raw psycopg COPY, 1,000/tx",
            len(encoded),
            size,
            raw_insert_postgres(url, encoded, copy=True),
        )
    raw = max(many, copied)

    def log_protos(writer: AgentRunWriter, count: int) -> None:
        for i in range(0, count, 100):
            writer.log_agent_runs([proto(j) for j in range(i, min(count, i + 100))])

    with database(server, folder, "grpc") as url:
        seconds, samples = grpc_upload(url, runs, log_protos, "wire")
    line("gRPC writer, wire-form runs", runs, size, seconds, raw)
    print()
    print(
        f"  gRPC wire-form / fastest raw insert: {runs / seconds / raw:.2f}x"
        " (PostgreSQL's target, from an issue before 29: >= 0.7x)"
    )
    print(f"  server RSS peak {max(rss for _, rss in samples) / 1e6:,.0f} MB")


def grpc_upload(
    db: Path | str, runs: int, log: Callable[[AgentRunWriter, int], None], label: str
) -> tuple[float, list[tuple[float, int]]]:
    """Seconds for a writer to deliver `runs` runs; the server's RSS samples (bytes sent, RSS)."""
    server, url = start_agentrun(db)
    samples: list[tuple[float, int]] = []
    done = threading.Event()
    try:
        with Client(url) as client:
            collection = client.create_collection(label).collection.id

        def sample() -> None:
            while not done.wait(0.25):
                samples.append((time.perf_counter(), rss_bytes(server.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        samples.append((time.perf_counter(), rss_bytes(server.pid)))
        sampler.start()
        started = time.perf_counter()
        writer = AgentRunWriter(collection, server_url=url)
        log(writer, runs)
        summary = writer.finish()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if summary.accepted != runs or not summary.ok:
            raise RuntimeError(f"{label}: expected {runs} accepted, got {summary}")
        with Client(url) as client:
            stored = client.get_collection(collection).run_count
        if stored != runs:
            raise RuntimeError(f"{label}: {stored} runs stored, expected {runs}")
    finally:
        stop(server)
    return seconds, [(t - started, rss) for t, rss in samples]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=65_000, help="runs through each gRPC path")
    parser.add_argument("--model-runs", type=int, default=20_000, help="runs from models")
    parser.add_argument("--http-runs", type=int, default=5_000, help="runs through HTTP+JSON")
    parser.add_argument(
        "--db",
        default=os.environ.get("DB"),
        help="PostgreSQL server (postgresql://USER@HOST:PORT/DBNAME; fresh databases are made on"
        " it): the writer through the server beside raw psycopg inserts [env DB; default: SQLite]",
    )
    args = parser.parse_args()
    if not TAU_BENCH.exists():
        print(f"skipped: real data not found at {TAU_BENCH} (set AGENTRUN_SHARED_DATA)")
        return 0
    base = load_agent_runs(TAU_BENCH)
    protos = [agent_run_to_proto(run) for run in base]

    def proto(i: int) -> agent_run_pb2.AgentRun:
        message = protos[i % len(protos)]
        message.id = f"{base[i % len(base)].id}-{i}"
        return message

    def model(i: int) -> AgentRun:
        return base[i % len(base)].model_copy(update={"id": f"{base[i % len(base)].id}-{i}"})

    encoded = [(f"{i}", proto(i).SerializeToString()) for i in range(args.runs)]
    size = sum(len(data) for _, data in encoded)
    mean = size / len(encoded)
    print(
        f"agentrun ingestion benchmark: {len(base)} tau-bench runs repeated, mean {mean / 1e3:.1f} kB"
        f" encoded; {machine()}"
    )
    if args.db:
        with tempfile.TemporaryDirectory() as tmp:
            postgres(args.db, Path(tmp), encoded, size, args.runs, proto)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = line(
            "raw SQLite insert (storage limit)",
            len(encoded),
            size,
            raw_insert(folder / "raw.db", encoded),
        )
        del encoded

        def log_protos(writer: AgentRunWriter, runs: int) -> None:
            for i in range(0, runs, 100):
                writer.log_agent_runs([proto(j) for j in range(i, min(runs, i + 100))])

        seconds, samples = grpc_upload(folder / "grpc.db", args.runs, log_protos, "wire")
        line("gRPC writer, wire-form runs", args.runs, size, seconds, raw)

        def log_models(writer: AgentRunWriter, runs: int) -> None:
            for i in range(0, runs, 100):
                writer.log_agent_runs([model(j) for j in range(i, min(runs, i + 100))])

        model_size = int(mean * args.model_runs)
        model_seconds, _ = grpc_upload(folder / "models.db", args.model_runs, log_models, "models")
        grpc_models = line("gRPC writer, model runs", args.model_runs, model_size, model_seconds)

        from http_baseline import docent_dump, plain_dump, upload  # bench/ is on sys.path when run

        models = [model(i) for i in range(args.http_runs)]
        rates = []
        for label, dump in (("Docent-style", docent_dump), ("without .text", plain_dump)):
            http_server, port = start(
                [
                    sys.executable,
                    str(ROOT / "bench" / "http_baseline.py"),
                    "--db",
                    str(folder / f"http-{len(rates)}.db"),
                ],
                r"listening on (\d+)",
            )
            try:
                started = time.perf_counter()
                stored = upload(port, models, dump)
                http_seconds = time.perf_counter() - started
            finally:
                stop(http_server)
            if stored != args.http_runs:
                raise RuntimeError(f"HTTP baseline stored {stored} of {args.http_runs}")
            rates.append(
                line(
                    f"HTTP+JSON ({label})", args.http_runs, int(mean * args.http_runs), http_seconds
                )
            )
        http, http_plain = rates
    print()
    print(f"  gRPC wire-form / raw insert: {args.runs / seconds / raw:.2f}x (issue 29: >= 0.85x)")
    print(f"  gRPC models / raw insert:    {grpc_models / raw:.2f}x (issue 29: >= 0.6x)")
    print(f"  gRPC models / HTTP+JSON:     {grpc_models / http:.2f}x (target >= 4x)")
    print(f"  gRPC models / HTTP+JSON without .text: {grpc_models / http_plain:.2f}x")
    print()
    print("  server RSS while ingesting (wire-form run):")
    per_second = size / seconds
    marks = [0.0, 0.25, 0.5, 0.75, 1.0]
    for mark in marks:
        t = mark * seconds
        at = min(samples, key=lambda s: abs(s[0] - t))
        print(f"    {max(0.0, per_second * at[0]) / MB:>7,.0f} MB sent: {at[1] / MB:6.0f} MB RSS")
    peak = max(rss for _, rss in samples)
    print(f"    peak {peak / MB:.0f} MB over {size / MB:,.0f} MB ingested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
