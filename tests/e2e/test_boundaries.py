"""The house's rooms at run time: a server process that has served every kind of call has loaded
none of the SDK (only its contract, `agentrun.v1` and `agentrun.wire`) and no pydantic, tiktoken
or rich. `make lint` checks the same statically (import-linter)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SERVE_AND_REPORT = textwrap.dedent(
    """
    import asyncio, json, sys
    import grpc
    from agentrun.v1 import agent_run_pb2 as run_pb
    from agentrun.v1 import ingestion_service_pb2 as ingest_pb, ingestion_service_pb2_grpc as ingest
    from agentrun.v1 import orchestrator_service_pb2 as pb, orchestrator_service_pb2_grpc as orch
    from agentrun.v1 import workflow_pb2
    from agentrun_server import Server, ServerConfig

    async def main():
        server = Server(ServerConfig(db=sys.argv[1], port=0, metrics_port=0, web_port=0))
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            i, o = ingest.IngestionServiceStub(channel), orch.OrchestratorServiceStub(channel)
            await o.ApplyWorkflow(pb.ApplyWorkflowRequest(workflow=workflow_pb2.Workflow(
                name="w", stages=[workflow_pb2.Stage(name="s")])))
            c = (await i.CreateCollection(ingest_pb.CreateCollectionRequest(
                name="c", workflow="w"))).collection.id
            run = run_pb.AgentRun(id="r")
            run.transcripts.add(key="t").messages.add(text="hi").user.SetInParent()
            await i.UploadAgentRuns(iter([ingest_pb.UploadAgentRunsRequest(
                collection_id=c, agent_runs=[run])]))
            events = i.StreamAgentRunEvents()
            patch = run_pb.AgentRun()
            patch.transcripts.add(key="t").messages.add(text="hi").user.SetInParent()
            await events.write(ingest_pb.StreamAgentRunEventsRequest(events=[ingest_pb.AgentRunEvent(
                agent_run_id="live", sequence=1, collection_id=c, patch=patch, finish=True)]))
            await events.read()
            await events.done_writing()
            await i.GetAgentRun(ingest_pb.GetAgentRunRequest(agent_run_id="live"))
            work = o.Work()
            await work.write(pb.WorkRequest(subscribe=pb.Subscribe(
                workflow="w", stages=[pb.StageSubscription(stage="s")], credits=2)))
            await work.read()
            leases = []
            while len(leases) < 2:
                leases += (await work.read()).leases.leases
            await work.write(pb.WorkRequest(complete_tasks=pb.CompleteTasks(completions=[
                pb.TaskCompletion(task_id=l.task_id, lease_id=l.lease_id) for l in leases])))
            await work.read()
            await work.done_writing()
            await o.GetBacklog(pb.GetBacklogRequest())
        await server.shutdown(1)
        print(json.dumps(sorted(sys.modules)))

    asyncio.run(main())
    """
)


def test_a_serving_server_loads_none_of_the_sdk(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVE_AND_REPORT, f"sqlite:///{tmp_path / 'a.db'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    heavy = [m for m in loaded if m.split(".")[0] in ("pydantic", "tiktoken", "rich")]
    sdk = [
        m
        for m in loaded
        if m.startswith("agentrun.") and not m.startswith(("agentrun.v1", "agentrun.wire"))
    ]
    assert (heavy, sdk) == ([], [])
    assert "agentrun.wire.checks" in loaded and "agentrun_server.ingestion" in loaded
