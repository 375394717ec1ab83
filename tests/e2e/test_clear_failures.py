"""Failures a new user meets first: a server that is not there, a port already taken. Each is
answered within seconds, in one line that names the address and what to do."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentrun import AgentRunWriter, Client, RpcError, Runner, init
from agentrun._retry import Backoff

from ..processes import ServerProcess, free_port


def nowhere() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def test_every_client_names_an_unreachable_server_within_seconds() -> None:
    address = nowhere()
    calls = {
        "Client": lambda: Client(address).list_collections(),
        "init": lambda: init("c", server_url=address),
        "Runner": lambda: _runner(address)(),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(RpcError) as raised:
            call()
        assert time.monotonic() - started < 8, name
        assert f"cannot reach the agentrun server at {address}: connection refused" in str(
            raised.value
        ), name
    started = time.monotonic()
    cli = subprocess.run(
        [sys.executable, "-m", "agentrun._cli", "stats", "--server", address],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert time.monotonic() - started < 10
    assert cli.returncode == 1
    assert f"cannot reach the agentrun server at {address}" in cli.stderr
    assert "Traceback" not in cli.stderr


def _runner(address: str) -> Runner:
    runner = Runner(workflow="w", server_url=address)

    @runner.stage("s")
    def stage(run: object) -> None:
        return None

    return runner


def test_a_writer_says_once_that_its_server_is_out_of_reach(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="agentrun")
    writer = AgentRunWriter(
        "c",
        server_url=nowhere(),
        batch_size=1,
        flush_interval=0.01,
        shutdown_timeout=1.5,
        backoff=Backoff(initial_seconds=0.05, max_seconds=0.1),
    )
    from .test_writer import make_run

    writer.log_agent_runs([make_run(f"r{i}") for i in range(3)])
    summary = writer.finish()
    assert summary.undelivered == 3
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "cannot reach" in r.getMessage()
    ]
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "retrying in the background" in warnings[0]
    assert len(retries) > 3  # it kept retrying, quietly


def test_a_second_server_on_a_taken_port_exits_at_once_saying_so(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "first.db") as first:
        metrics_port, web_port = free_port(), free_port()
        for args, flag, other_port in (
            (["--port", str(first.port), "--metrics-port", "-1"], "--port", 0),
            (["--port", "0", "--metrics-port", str(metrics_port)], "--metrics-port", metrics_port),
            (
                ["--port", "0", "--metrics-port", "-1", "--web-port", str(web_port)],
                "--web-port",
                web_port,
            ),
        ):
            if other_port:  # another process holds that port
                import socket

                taken = socket.socket()
                taken.bind(("127.0.0.1", other_port))
                taken.listen()
            if flag != "--web-port":
                args += ["--web-port", "-1"]
            second = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "agentrun._cli",
                    "serve",
                    "--db",
                    f"sqlite:///{tmp_path / 'second.db'}",
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if other_port:
                taken.close()
            assert second.returncode == 1, second.stderr
            assert f"agentrun serve: {flag}: cannot" in second.stderr
            assert "Traceback" not in second.stderr
        # The first still serves alone.
        with Client(first.url) as client:
            assert client.list_collections() == []


def test_finishing_twice_says_it_finished_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agentrun")
    from .test_writer import make_run

    with AgentRunWriter("c", server_url=nowhere(), shutdown_timeout=0.5) as writer:
        writer.log_agent_runs([make_run("r1")])
    again = writer.finish()  # after `with`, as the README's example does
    assert again.undelivered == 1
    finished = [r for r in caplog.records if "writer finished" in r.getMessage()]
    assert len(finished) == 1
