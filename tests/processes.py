"""Real processes for tests that kill and restart: the server as `agentrun serve` in a subprocess."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_PORTS = range(20_000, 32_000)
"""Where `free_port` looks: below the kernel's ephemeral range (32768-60999 on Linux), which it
hands to every outgoing connection, so a port found free there could be taken by some client's
connection before the server binds it (a CI run saw a metrics port taken so)."""


def free_port() -> int:
    """A port free now on 127.0.0.1 and outside the ephemeral range (for a server that must
    come back on the same one, or whose port a test names before starting it)."""
    for _ in range(1000):
        port = random.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


class ServerProcess:
    """`agentrun serve` on a database (a URL, or a SQLite file's path) and a fixed port, which can
    be killed and started again."""

    def __init__(
        self,
        db: Path | str,
        port: int | None = None,
        *extra_args: str,
        program: list[str] | None = None,
        health_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        # `program`: the command that is `agentrun` (default: this interpreter's SDK);
        # `health_credentials`: TLS to ask health with, for a server serving TLS.
        self.program = program or [sys.executable, "-m", "agentrun._cli"]
        self.health_credentials = health_credentials
        self.db = db if isinstance(db, str) else f"sqlite:///{db}"
        self.port = port or free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        # The server's log, shown when a test fails around it (a server that exited, and why):
        # beside its SQLite file (in the test's tmp_path), else a temporary file of its own.
        if isinstance(db, Path):
            self.log, self._own_log = db.parent / f"server-{self.port}.log", False
        else:
            fd, name = tempfile.mkstemp(prefix="agentrun-server-", suffix=".log")
            os.close(fd)
            self.log, self._own_log = Path(name), True

    def start(self, timeout_seconds: float = 30) -> ServerProcess:
        """Start and wait until health says SERVING."""
        command = [*self.program, "serve", "--db", self.db]
        command += ["--port", str(self.port), "--metrics-port", "-1", "--web-port", "-1"]
        command += self.extra_args
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy()
            )
        deadline = time.monotonic() + timeout_seconds
        channel = (
            grpc.secure_channel(self.url, self.health_credentials)
            if self.health_credentials is not None
            else grpc.insecure_channel(self.url)
        )
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.process.kill()  # not left serving behind a failed test
                    self.process.wait(timeout=10)
                    raise TimeoutError(f"server did not become SERVING:\n{self.log_tail()}")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout_seconds: float = 30) -> int:
        """SIGTERM; return the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_seconds)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server logged."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, kind: object = None, *exc: object) -> None:
        if kind is not None and self.process is not None:
            # pytest shows what a failed test wrote: the server's side of it.
            exited = self.process.poll()
            state = "running" if exited is None else f"exited with {exited}"
            print(
                f"server on port {self.port} ({state}); its log:\n{self.log_tail()}",
                file=sys.stderr,
            )
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self._own_log:
            self.log.unlink(missing_ok=True)


def agentrun_cli(
    server: ServerProcess, *args: str, timeout_seconds: float = 60
) -> subprocess.CompletedProcess[str]:
    """`agentrun ARGS --server URL` as users run it, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "agentrun._cli", *args, "--server", server.url],
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
    )
