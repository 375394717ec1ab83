"""The deploy/ folder against a real Prometheus (Debian's package, installed when missing).

Both services run apart (one process each, as `agentrun serve --only ...` would, sharing one SQLite
file), real traffic goes through them from a writer and a Runner, Prometheus scrapes them with the
project's scrape config, and every dashboard panel and alert expression is asked of its HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import pytest
import yaml
from prometheus_client import CollectorRegistry

from agentrun import AgentRun, AgentRunWriter, BaseAgentRunMetadata, Client, Runner, Transcript
from agentrun.chat import AssistantMessage, UserMessage
from agentrun.v1 import agent_run_pb2, workflow_pb2
from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from agentrun.v1 import orchestrator_service_pb2 as orchestrator_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orchestrator_grpc
from agentrun_server import Server, ServerConfig

from ..processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRAPE_INTERVAL_SECONDS = 1


def ensure_installed(binary: str) -> str:
    """The path of a Prometheus binary, installing Debian's `prometheus` package if missing."""
    found = shutil.which(binary)
    if found:
        return found
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    result = subprocess.run(install, capture_output=True, text=True, check=False)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        result = subprocess.run(install, capture_output=True, text=True, check=False)
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"cannot install Debian's prometheus package:\n{result.stdout}{result.stderr}")
    return found


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return ensure_installed("prometheus")


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    return ensure_installed("promtool")


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "agentrun.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def test_the_dashboard_imports_as_grafana_users_import_dashboards() -> None:
    """A stable uid, the data source asked for on import (`__inputs`), and job, instance and
    workflow variables that every server series is filtered by."""
    dashboard = json.loads((DEPLOY / "grafana" / "agentrun.json").read_text())
    assert dashboard["uid"] == "agentrun"
    (wanted,) = dashboard["__inputs"]
    assert (wanted["name"], wanted["type"], wanted["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "workflow"]
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    for name in ("job", "instance", "workflow"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            if "agentrun_writer_" in target["expr"] or "agentrun_runner_" in target["expr"]:
                continue  # the clients' own processes: not a server job or instance
            assert 'job=~"$job", instance=~"$instance"' in target["expr"], target["expr"]
            if "agentrun_stage_tasks" in target["expr"]:
                assert 'workflow=~"$workflow"' in target["expr"]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Ingestion", "OpenTelemetry in", "Live runs", "gRPC", "Orchestrator", "Clients"]
    for provisioned in (DEPLOY / "grafana" / "provisioning").rglob("*.yaml"):
        assert yaml.safe_load(provisioned.read_text())["apiVersion"] == 1


def variable_values(port: int) -> dict[str, set[str]]:
    """Each query variable's values, as Grafana's label_values(SELECTOR, LABEL) finds them."""
    dashboard = json.loads((DEPLOY / "grafana" / "agentrun.json").read_text())
    values = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = variable["definition"].removeprefix("label_values(")[:-1].rsplit(", ", 1)
        query = urllib.parse.urlencode({"match[]": substituted(selector)})
        series = http_get(f"http://127.0.0.1:{port}/api/v1/series?{query}")["data"]
        values[variable["name"]] = {s[label] for s in series if label in s}
    return values


def test_the_deploy_files_pass_promtool(promtool_bin: str) -> None:
    for command in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
    ):
        result = subprocess.run([promtool_bin, *command], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def http_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    return json.loads(body) if body.startswith("{") else body


ALL = {"job": ".*", "instance": ".*", "workflow": ".*"}
"""The dashboard's variables at their "All" value, as Grafana sends them."""


def substituted(expr: str, variables: dict[str, str] | None = None) -> str:
    """An expression as Grafana sends it: the rate interval and the variables filled in."""
    expr = expr.replace("$__rate_interval", "1m")
    for name, value in (variables or ALL).items():
        expr = expr.replace(f"${name}", value)
    return expr


def prometheus_query(
    port: int, expr: str, variables: dict[str, str] | None = None
) -> dict[str, Any]:
    query = urllib.parse.urlencode({"query": substituted(expr, variables)})
    try:
        return http_get(f"http://127.0.0.1:{port}/api/v1/query?{query}")  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:  # 400: the expression does not parse
        return json.loads(exc.read().decode())  # type: ignore[no-any-return]


@contextlib.contextmanager
def prometheus(binary: str, tmp_path: Path, targets: dict[str, list[str]]) -> Iterator[int]:
    """Prometheus on loopback with the project's config, its targets pointed at `targets`."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_SECONDS}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_SECONDS}s"
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), "the test must cover every job of the project's config"
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": targets[name]}]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def make_run(i: int) -> AgentRun:
    return AgentRun(
        id=f"run-{i}",
        transcripts={
            "t": Transcript(
                messages=[UserMessage(content=f"task {i}"), AssistantMessage(content="done")]
            )
        },
        metadata=BaseAgentRunMetadata(scores={"reward": float(i % 3)}),
    )


@pytest.fixture
async def split_services(database: str) -> AsyncIterator[tuple[Server, Server]]:
    db = database
    servers = [
        Server(
            ServerConfig(db=db, port=0, metrics_port=0, web_port=-1, services=(service,)),
            CollectorRegistry(),
        )
        for service in ("ingestion", "orchestrator")
    ]
    for server in servers:
        await server.start()
    yield servers[0], servers[1]
    for server in servers:
        await server.shutdown(grace_seconds=1)


async def drive_traffic(ingestion: Server, orchestrator: Server) -> None:
    """Uploads (with a rejected run), a workflow worked by a Runner (with dead tasks)."""
    workflow = workflow_pb2.Workflow(
        name="grading",
        stages=[
            workflow_pb2.Stage(
                name="triage",
                pathways=[
                    workflow_pb2.Pathway(name="solved", next_stage="review"),
                    workflow_pb2.Pathway(name="failed", next_stage="review"),
                ],
            ),
            workflow_pb2.Stage(name="review"),
        ],
    )
    orchestrator_url = f"127.0.0.1:{orchestrator.port}"
    ingestion_url = f"127.0.0.1:{ingestion.port}"

    def upload() -> None:
        with Client(orchestrator_url) as client:
            client.apply_workflow(workflow)
        with Client(ingestion_url) as client:
            collection = client.create_collection("evals", workflow="grading").collection
        with AgentRunWriter(collection.id, server_url=ingestion_url) as writer:
            writer.log_agent_runs(make_run(i) for i in range(60))
            with writer.live_run(name="live") as live:  # enters the workflow when it finishes
                for step in range(3):
                    live.append("t", [UserMessage(content=f"step {step}")])
                live.set_scores(reward=1.0)
            still_going = writer.live_run(name="still going")  # never finished: running
            still_going.append("t", [UserMessage(content="step 0")])
        with grpc.insecure_channel(ingestion_url) as channel:
            stub = ingestion_grpc.IngestionServiceStub(channel)
            invalid = agent_run_pb2.AgentRun(id="no-transcripts")
            request = ingestion_pb.UploadAgentRunsRequest(
                collection_id=collection.id, agent_runs=[invalid]
            )
            assert len(stub.UploadAgentRuns(iter([request])).rejected) == 1

    await asyncio.to_thread(upload)

    runner = Runner(workflow="grading", server_url=orchestrator_url)

    @runner.stage("triage")
    def triage(run: AgentRun) -> str:
        if run.metadata.scores["reward"] == 2.0:
            raise RuntimeError("cannot triage")
        return "solved" if run.metadata.scores["reward"] else "failed"

    @runner.stage("review")
    def review(run: AgentRun) -> None:
        return None

    summary = await asyncio.to_thread(runner, num_retries=0)
    assert sum(summary.completed.values()) == 82  # 40 uploaded and 1 live run triaged, reviewed
    assert sum(summary.dead.values()) == 20
    await end_leases(ingestion_url, orchestrator_url, orchestrator.registry)


async def end_leases(
    ingestion_url: str, orchestrator_url: str, registry: CollectorRegistry
) -> None:
    """Two tasks on their last attempt: one worker lets its lease expire, another closes its stream.
    Returns once the orchestrator has ended both leases."""

    def set_up() -> None:
        with Client(orchestrator_url) as client:
            client.apply_workflow(
                workflow_pb2.Workflow(
                    name="holding",
                    stages=[
                        workflow_pb2.Stage(
                            name="hold", retry_policy=workflow_pb2.RetryPolicy(max_attempts=1)
                        )
                    ],
                )
            )
        with Client(ingestion_url) as client:
            collection = client.create_collection("held", workflow="holding").collection
        with AgentRunWriter(collection.id, server_url=ingestion_url, flush_interval=0.01) as writer:
            writer.log_agent_runs(make_run(1000 + i) for i in range(2))

    await asyncio.to_thread(set_up)
    async with grpc.aio.insecure_channel(orchestrator_url) as channel:
        stub = orchestrator_grpc.OrchestratorServiceStub(channel)
        calls = []
        for lease_seconds in (0.2, 60.0):
            call = stub.Work()
            subscribe = orchestrator_pb.Subscribe(
                workflow="holding", stages=[orchestrator_pb.StageSubscription(stage="hold")]
            )
            subscribe.credits = 1
            subscribe.lease_duration.FromMilliseconds(int(lease_seconds * 1000))
            await call.write(orchestrator_pb.WorkRequest(subscribe=subscribe))
            while (await asyncio.wait_for(call.read(), 10)).WhichOneof("kind") != "leases":
                pass
            calls.append(call)
        expiring, closing = calls
        await closing.done_writing()  # closed by its worker: the lease it holds ends at once

        def ended() -> float:  # off the loop, as a scrape is: the backlog collector uses it
            return sum(
                registry.get_sample_value(
                    "agentrun_tasks_dead_total",
                    {"workflow": "holding", "stage": "hold", "reason": reason},
                )
                or 0
                for reason in ("lease_expired", "stream_closed")
            )

        deadline = time.monotonic() + 10
        while await asyncio.to_thread(ended) < 2:
            assert time.monotonic() < deadline, "the orchestrator did not end both leases"
            await asyncio.sleep(0.05)
        expiring.cancel()


async def test_leases_the_server_ends_are_counted_by_stage_and_dead_letters_by_reason(
    server: Server,
) -> None:
    url = f"127.0.0.1:{server.port}"
    await end_leases(url, url, server.registry)
    hold = {"workflow": "holding", "stage": "hold"}
    dead = "agentrun_tasks_dead_total"
    samples = await asyncio.to_thread(
        lambda: [
            server.registry.get_sample_value(name, labels)
            for name, labels in [
                ("agentrun_tasks_expired_leases_total", hold),
                (dead, {**hold, "reason": "lease_expired"}),
                (dead, {**hold, "reason": "stream_closed"}),
                (dead, {**hold, "reason": "failed"}),
            ]
        ]
    )
    assert samples == [1, 1, 1, None]


async def test_every_panel_and_alert_expression_against_prometheus(
    split_services: tuple[Server, Server], prometheus_bin: str, tmp_path: Path
) -> None:
    ingestion, orchestrator = split_services
    client_metrics, client_thread = prometheus_client.start_http_server(0, addr="127.0.0.1")
    targets = {
        "agentrun": [
            f"127.0.0.1:{ingestion.metrics_port}",
            f"127.0.0.1:{orchestrator.metrics_port}",
        ],
        "agentrun-clients": [f"127.0.0.1:{client_metrics.server_port}"],
    }
    try:
        with prometheus(prometheus_bin, tmp_path, targets) as port:
            await wait_for_targets(port, 3)
            await drive_traffic(ingestion, orchestrator)
            # A worker stays connected, idle, so worker and credit panels have a live series.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
                stub = orchestrator_grpc.OrchestratorServiceStub(channel)
                requests: asyncio.Queue[orchestrator_pb.WorkRequest | None] = asyncio.Queue()
                subscribe = orchestrator_pb.Subscribe(
                    workflow="grading",
                    stages=[orchestrator_pb.StageSubscription(stage="triage")],
                    credits=5,
                )
                await requests.put(orchestrator_pb.WorkRequest(subscribe=subscribe))
                call = stub.Work(queue_iterator(requests))
                assert (await call.read()).HasField("subscribed")
                # Two scrapes after the traffic give every rate() two samples to work on.
                await asyncio.sleep(3 * SCRAPE_INTERVAL_SECONDS + 0.5)
                results = await asyncio.to_thread(
                    lambda: {
                        (title, expr): prometheus_query(port, expr)
                        for title, expr in dashboard_expressions() + alert_expressions()
                    }
                )
                variables = await asyncio.to_thread(variable_values, port)
                dead = dict(dashboard_expressions())["Dead tasks"]
                one_workflow = await asyncio.to_thread(
                    prometheus_query, port, dead, {**ALL, "job": "agentrun", "workflow": "grading"}
                )
                other_workflow = await asyncio.to_thread(
                    prometheus_query, port, dead, {**ALL, "workflow": "no-such-workflow"}
                )
                await requests.put(None)
            rules = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/api/v1/rules")
    finally:
        client_metrics.shutdown()
        client_metrics.server_close()
        client_thread.join(timeout=5)

    panels = {title for title, _ in dashboard_expressions()}
    not_parsed = {k: r.get("error") for k, r in results.items() if r["status"] != "success"}
    assert not not_parsed
    empty = [
        expr for (title, expr), r in results.items() if title in panels and not r["data"]["result"]
    ]
    assert not empty, f"panel expressions without data: {empty}"
    loaded = {rule["name"]: rule["health"] for g in rules["data"]["groups"] for rule in g["rules"]}
    assert loaded == {name: "ok" for name, _ in alert_expressions()}
    # The traffic is in the figures, not only in the series.
    assert value_of(results, "Runs / s", "agentrun_ingest_stored_runs_total") > 0
    assert value_of(results, "Live run events / s by status", "agentrun_ingest_live_events") > 0
    assert value_of(results, "Dead tasks", "agentrun_stage_tasks") == 22
    assert value_of(results, "Live runs by state", "agentrun_live_runs") == 1
    # The variables find their values, and narrow the panels to what they name.
    assert variables["job"] == {"agentrun", "agentrun-clients"}
    assert variables["instance"] == {t for ts in targets.values() for t in ts}
    assert "grading" in variables["workflow"]
    narrowed = one_workflow["data"]["result"]
    assert narrowed and {s["metric"]["workflow"] for s in narrowed} == {"grading"}
    dead_all = next(r for (title, _), r in results.items() if title == "Dead tasks")
    grading = [s for s in dead_all["data"]["result"] if s["metric"]["workflow"] == "grading"]
    assert sorted(s["value"][1] for s in narrowed) == sorted(s["value"][1] for s in grading)
    assert len(dead_all["data"]["result"]) > len(narrowed)  # the other workflows filtered out
    assert other_workflow["status"] == "success" and not other_workflow["data"]["result"]


def value_of(results: dict[tuple[str, str], dict[str, Any]], title: str, metric: str) -> float:
    for (panel, expr), result in results.items():
        if panel == title and metric in expr:
            return sum(float(sample["value"][1]) for sample in result["data"]["result"])
    raise AssertionError(f"no {metric} expression in panel {title!r}")


async def queue_iterator(
    queue: asyncio.Queue[orchestrator_pb.WorkRequest | None],
) -> AsyncIterator[orchestrator_pb.WorkRequest]:
    while (item := await queue.get()) is not None:
        yield item


async def wait_for_targets(port: int, count: int, timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = await asyncio.to_thread(prometheus_query, port, "up == 1")
            if last["status"] == "success" and len(last["data"]["result"]) == count:
                return
        await asyncio.sleep(0.25)
    pytest.fail(f"Prometheus did not scrape {count} targets within {timeout_seconds} s: {last}")


async def test_every_metrics_endpoint_passes_promtool(
    split_services: tuple[Server, Server], promtool_bin: str
) -> None:
    pages = [
        await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.metrics_port}/metrics")
        for server in split_services
    ]
    pages.append(prometheus_client.generate_latest().decode())  # the writer's and Runner's
    names = set()
    for page in pages:
        result = await asyncio.to_thread(
            subprocess.run,
            [promtool_bin, "check", "metrics"],
            input=page,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        names |= {line.split()[2] for line in page.splitlines() if line.startswith("# TYPE")}
    assert {
        "grpc_server_handled_total",
        "agentrun_ingest_stored_runs_total",
        "agentrun_stage_tasks",
        "agentrun_writer_runs_total",
        "agentrun_runner_tasks_total",
    } <= names
