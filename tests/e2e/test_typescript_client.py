"""The TypeScript client (clients/typescript) against a live server: its own node tests (the
generated clients, live runs, the Worker), run with $AGENTRUN_SERVER pointing at a real server on
a real socket; its types checked against a user's code; and the package installed into a fresh
Node project from a packed tarball and from the folder, running a worker from there."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentrun_server import Server

from ..processes import ServerProcess

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


WORKER = """
import { connect, Worker } from "agentrun-grpc";
const { ingestion, orchestrator } = connect();
await orchestrator.applyWorkflow({ workflow: { name: "installed", stages: [{ name: "read" }] } });
const { collection } = await ingestion.createCollection({ name: "installed", workflow: "installed" });
const run = (id) => ({ id, transcripts: [{ key: "main", messages: [
  { content: { case: "text", value: "hi" }, role: { case: "user", value: {} } }] }] });
async function* batches() { yield { collectionId: collection.id, agentRuns: [run("a"), run("b"), run("c")] }; }
await ingestion.uploadAgentRuns(batches());
const worker = new Worker({ workflow: "installed", exitWhenEmpty: true,
  stages: { read: (lease) => ({ output: { id: lease.agentRun.id } }) } });
const summary = await worker.run();
console.log(`completed=${summary.completed.read}`);
"""


@pytest.mark.parametrize("how", ["tarball", "folder"])
def test_the_package_installs_into_a_fresh_project_and_runs_a_worker(
    tmp_path: Path, how: str
) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node and npm are not installed")
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text('{"name": "user", "private": true, "type": "module"}')
    if how == "tarball":
        packed = subprocess.run(
            [npm, "pack", "--pack-destination", str(tmp_path)],
            cwd=CLIENT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        source = [str(tmp_path / packed.stdout.strip().splitlines()[-1])]
    else:
        source = ["--install-links", str(CLIENT)]
    installed = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", *source],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    (project / "worker.mjs").write_text(WORKER)
    with ServerProcess(tmp_path / "agentrun.db") as server:
        ran = subprocess.run(
            ["node", "worker.mjs"],
            cwd=project,
            env={**os.environ, "AGENTRUN_SERVER": f"grpc://{server.url}"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "completed=3"
