"""Servers in subprocesses for the benchmarks (started, their ports read off their first line),
and the machine the figures were measured on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
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


def start_agentrun(db: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """`agentrun serve` on a SQLite file and a free port, without metrics; return it and its URL."""
    serve = ["serve", "--db", f"sqlite:///{db}", "--port", "0", "--metrics-port", "-1", *args]
    process, port = start([sys.executable, "-m", "agentrun._cli", *serve], r"on [\d.]+:(\d+)")
    return process, f"127.0.0.1:{port}"


def start_agentrun_with_metrics(db: Path) -> tuple[subprocess.Popen[str], str, str]:
    """`agentrun serve` with metrics on a free port; return it, its URL and its metrics URL."""
    serve = ["serve", "--db", f"sqlite:///{db}", "--port", "0", "--metrics-port", "0"]
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
