"""The README's pictures of the web console (`make screenshots`): a server on a fresh SQLite file
with the quick start's example runs (examples/runs.jsonl) through examples/grading.yaml, where
the review of three runs fails (dead letters to show), then the run page and the workflow page
as headless Chromium (Debian's, `make install-browser`) draws them, into docs/."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from playwright.sync_api import sync_playwright

from agentrun import (
    AgentRunWriter,
    Client,
    Fail,
    Runner,
    StageResult,
    TaskContext,
    load_agent_runs,
    load_workflow,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FAILING = 3


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve(folder: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, web_port = _port(), _port()
    command = [sys.executable, "-m", "agentrun._cli", "serve", "--db", f"sqlite:///{folder}/a.db"]
    command += ["--port", str(port), "--metrics-port", "-1", "--web-port", str(web_port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(200):
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return process, address, f"http://127.0.0.1:{web_port}"
            except grpc.RpcError:
                time.sleep(0.05)
    process.kill()
    raise SystemExit("screenshots: the server did not start")


def main() -> int:
    chromium = shutil.which("chromium")
    if chromium is None:
        print("screenshots: chromium not installed (make install-browser)", file=sys.stderr)
        return 1
    runs = load_agent_runs(ROOT / "examples" / "runs.jsonl")
    failing = {run.id for run in runs[:FAILING]}
    with tempfile.TemporaryDirectory() as folder:
        process, address, web = _serve(Path(folder))
        try:
            with Client(address) as client:
                client.apply_workflow(load_workflow(ROOT / "examples" / "grading.yaml").to_proto())
                collection = client.create_collection("airline", workflow="grading").collection
            writer = AgentRunWriter(collection.id, server_url=address)
            writer.log_agent_runs(runs)
            writer.finish()
            runner = Runner(workflow="grading", server_url=address)

            @runner.stage("triage")
            def triage(task: TaskContext) -> StageResult:
                return StageResult("failed" if task.agent_run_id in failing else "solved")

            @runner.stage("review")
            def review(task: TaskContext) -> object:
                if task.agent_run_id in failing:
                    return Fail("judge model timed out after 60 s (HTTP 504 from the gateway)")
                return StageResult(None, {"verdict": "ok"})

            runner(progress=False)
            shown = runs[FAILING]
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium, args=["--no-sandbox"]
                )
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(f"{web}/runs/{shown.id}")
                page.screenshot(path=str(DOCS / "console-run.png"))
                page.goto(f"{web}/workflows/grading")
                page.screenshot(path=str(DOCS / "console-workflow.png"), full_page=True)
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
    print("screenshots: wrote docs/console-run.png, docs/console-workflow.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
