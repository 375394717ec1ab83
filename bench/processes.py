"""Servers in subprocesses for the benchmarks: started, their port read off their first line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def start(command: list[str], pattern: str) -> tuple[subprocess.Popen[str], int]:
    """Start a server subprocess; return it and the port its first matching line names."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(pattern, line)
        if match:
            return process, int(match.group(1))
    raise RuntimeError(f"{command[0]} exited before serving")


def start_agentrun(db: Path) -> tuple[subprocess.Popen[str], str]:
    """`agentrun serve` on a SQLite file and a free port, without metrics; return it and its URL."""
    serve = ["serve", "--db", f"sqlite:///{db}", "--port", "0", "--metrics-port", "-1"]
    process, port = start([sys.executable, "-m", "agentrun._cli", *serve], r"on [\d.]+:(\d+)")
    return process, f"127.0.0.1:{port}"


def stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM, and wait for the graceful exit."""
    process.terminate()
    process.wait(timeout=30)
