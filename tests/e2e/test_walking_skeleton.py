"""The user's path end to end: a server process, the writer, a Runner process, the stats RPC."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentrun
from agentrun._workflow import load_workflow

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture
def server_address(tmp_path: Path) -> Iterator[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentrun._cli",
            "serve",
            "--db",
            f"sqlite:///{tmp_path / 'a.db'}",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--web-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    try:
        assert "agentrun serving" in line, line + process.stdout.read()
        yield line.split(" on ", 1)[1].split(" ", 1)[0]
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        process.stdout.close()


def test_runs_are_stored_once_and_go_through_the_workflow(
    server_address: str, tau_bench_path: Path
) -> None:
    runs = agentrun.load_agent_runs(tau_bench_path)
    with agentrun.Client(server_address) as client:
        client.apply_workflow(load_workflow(ROOT / "examples" / "grading.yaml").to_proto())

    writer = agentrun.init(collection_name="airline", server_url=server_address, workflow="grading")
    writer.log_agent_runs(runs)
    first = writer.finish()
    assert (first.accepted, first.duplicates, first.rejected, first.undelivered) == (200, 0, [], 0)

    again = agentrun.init(collection_name="airline", server_url=server_address, workflow="grading")
    again.log_agent_runs(runs)
    second = again.finish()
    assert (second.accepted, second.duplicates, second.undelivered) == (0, 200, 0)

    worker = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grading_worker.py"), "--server", server_address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert worker.returncode == 0, worker.stderr

    with agentrun.Client(server_address) as client:
        (collection,) = client.list_collections()
        backlog = {s.stage: s for s in client.backlog("grading")}
    assert collection.run_count == 200
    assert set(backlog) == {"triage", "review"}
    for stage in backlog.values():
        assert stage.done_count == 200
        assert (stage.ready_count, stage.scheduled_count, stage.leased_count, stage.dead_count) == (
            0,
            0,
            0,
            0,
        )
