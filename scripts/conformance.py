"""Run the conformance scenario (tests/conformance/scenario.json) with every language's driver
against a live server (`make conformance`): a fresh server per driver, on a SQLite file, with
`--auth keys` and the scenario's keys. Prints one line per language, `python: passed N/N`, and
exits 1 if any step of any language failed (or a driver could not run).

    python scripts/conformance.py [--languages python,go] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentrun_server.auth import new_key
from agentrun_server.storage import open_storage

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "conformance" / "scenario.json"
GO_BIN = ROOT / "build" / "go" / "bin"


def drivers() -> dict[str, list[str]]:
    """Each language's driver command (the server URL, keys file and scenario follow)."""
    return {
        "python": [sys.executable, str(ROOT / "tests" / "conformance" / "driver.py")],
        "go": [str(GO_BIN / "conformance")],
        "typescript": ["node", str(ROOT / "clients" / "typescript" / "conformance" / "driver.mjs")],
        "cpp": [str(ROOT / "build" / "cpp" / "agentrun-conformance")],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _make_keys(db: str, scopes: dict[str, list[str]]) -> dict[str, str]:
    storage = await open_storage(db)
    try:
        tokens = {}
        for name, key_scopes in scopes.items():
            record, token = new_key(name, key_scopes)
            await storage.create_key(record)
            tokens[name] = token
        return tokens
    finally:
        await storage.close()


def _serve(db: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [sys.executable, "-m", "agentrun_server", "serve", "--db", db, "--auth", "keys"]
    command += ["--port", str(port), "--metrics-port", "-1", "--web-port", "-1"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out)
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log.read_text()[-2000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return process, url
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)


def run(language: str, command: list[str], verbose: bool) -> tuple[int, int, str]:
    """Run one driver against a fresh server; (passed, steps, its output)."""
    scenario = json.loads(SCENARIO.read_text())
    steps = len(scenario["steps"])
    with tempfile.TemporaryDirectory(prefix=f"agentrun-conformance-{language}-") as folder:
        db = f"sqlite:///{Path(folder) / 'agentrun.db'}"
        keys_file = Path(folder) / "keys.json"
        keys_file.write_text(json.dumps(asyncio.run(_make_keys(db, scenario["keys"]))))
        server, url = _serve(db, Path(folder) / "server.log")
        try:
            done = subprocess.run(
                [*command, "--server", url, "--keys", str(keys_file), "--scenario", str(SCENARIO)],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "AGENTRUN_SERVER": url},
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    output = done.stdout + done.stderr
    found = re.search(r"^passed (\d+)/(\d+)$", done.stdout, re.MULTILINE)
    passed = int(found.group(1)) if found else 0
    if verbose or done.returncode != 0:
        print(output, file=sys.stderr)
    return passed, steps, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default=",".join(drivers()))
    parser.add_argument("--verbose", action="store_true", help="print every driver's steps")
    args = parser.parse_args()
    failed = False
    for language in args.languages.split(","):
        command = drivers()[language]
        if shutil.which(command[0]) is None and not Path(command[0]).exists():
            print(
                f"{language}: cannot run, no {command[0]} (make build-go, build-cpp or install-ts)"
            )
            failed = True
            continue
        passed, steps, _ = run(language, command, args.verbose)
        print(f"{language}: passed {passed}/{steps}")
        failed |= passed != steps
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
