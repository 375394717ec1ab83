"""Servers in subprocesses for the benchmarks (started, their ports read off their first line),
and the machine the figures were measured on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def machine() -> str:
    """The CPU model, cores and Python that every printed figure is measured on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores; "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def start(command: list[str], pattern: str) -> tuple[subprocess.Popen[str], int]:
    """Start a server subprocess; return it and the port its first matching line names."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(pattern, line)
        if match:
            return process, int(match.group(1))
    raise RuntimeError(f"{command[0]} exited before serving")


@contextmanager
def database(server: str | None, folder: Path, name: str) -> Iterator[str]:
    """The URL of a fresh database: a SQLite file in `folder` (`server` None), or a new database
    on the PostgreSQL server `server` names (`postgresql://USER@HOST:PORT/DBNAME`), dropped
    afterwards."""
    if not server or server.startswith("sqlite"):
        yield f"sqlite:///{folder / f'{name}.db'}"
        return
    import psycopg

    database_name = f"agentrun_bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database_name}")
        try:
            yield f"{server.rsplit('/', 1)[0]}/{database_name}"
        finally:
            admin.execute(f"DROP DATABASE {database_name} WITH (FORCE)")


def start_agentrun(db: Path | str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """`agentrun serve` on a database (a URL, or a SQLite file's path) and a free port, without
    metrics; return it and its URL."""
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    serve = ["serve", "--db", url, "--port", "0", "--metrics-port", "-1", "--web-port", "-1", *args]
    process, port = start([sys.executable, "-m", "agentrun._cli", *serve], r"on [\d.]+:(\d+)")
    return process, f"127.0.0.1:{port}"


def start_agentrun_with_metrics(db: str) -> tuple[subprocess.Popen[str], str, str]:
    """`agentrun serve` on a database URL with metrics on a free port; return it, its URL and
    its metrics URL."""
    serve = ["serve", "--db", db, "--port", "0", "--metrics-port", "0", "--web-port", "-1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "agentrun._cli", *serve], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"on [\d.]+:(\d+) \(metrics on (\S+)[;)]", line)
        if match:
            return process, f"127.0.0.1:{match.group(1)}", match.group(2)
    raise RuntimeError("agentrun serve exited before serving")


def stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM, and wait for the graceful exit."""
    process.terminate()
    process.wait(timeout=30)


def percentile(values: list[float], p: float) -> float:
    """The `p` quantile (0 to 1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]
