"""The generated TypeScript client (clients/typescript) against a live server: its own node tests,
run with $AGENTRUN_SERVER pointing at a real server on a real socket."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from agentrun_server import Server

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "typescript"


async def test_the_typescript_clients_own_tests_pass_against_a_live_server(server: Server) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (CLIENT / "node_modules").is_dir():
        pytest.skip("clients/typescript/node_modules is missing: `make install-ts` runs npm ci")
    process = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "--test-reporter=spec",
        "test/",
        cwd=CLIENT,
        env={**os.environ, "AGENTRUN_SERVER": f"127.0.0.1:{server.port}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    report = output.decode()
    assert process.returncode == 0, report
    assert "skipped 0" in report, report  # the live tests ran, not skipped


async def test_the_typescript_types_check_against_a_users_code() -> None:
    # tsc --strict over the hand-written .d.ts, the generated ones and test/usage.ts.
    tsc = CLIENT / "node_modules" / ".bin" / "tsc"
    if shutil.which("node") is None or not tsc.exists():
        pytest.skip(
            "node or clients/typescript/node_modules is missing: `make install-ts` runs npm ci"
        )
    process = await asyncio.create_subprocess_exec(
        str(tsc),
        "-p",
        "tsconfig.json",
        cwd=CLIENT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()
