"""TLS and mTLS on the gRPC port, with certificates made here (tests/certificates.py): plaintext
refused, a client trusting the CA served, client certificates admitted by their subject's key
entry, certificates reloaded without dropping streams; and every client (writer, Runner, CLI,
TypeScript) end to end over TLS with an API key."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentrun import AgentRun, AgentRunWriter, Client, Connection, Runner, Transcript
from agentrun._convert import agent_run_to_proto
from agentrun.chat import UserMessage
from agentrun.v1 import ingestion_service_pb2 as ingest_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingest_grpc
from agentrun.v1 import orchestrator_service_pb2 as orch_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orch_grpc
from agentrun.v1 import workflow_pb2
from agentrun_server import Server, ServerConfig, TlsConfig
from agentrun_server.auth import new_key

from ..certificates import Authority, Issued

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "typescript"


async def _key(server: Server, name: str, scopes: list[str], subject: str = "") -> str:
    record, token = new_key(name, scopes, subject=subject)
    assert server._storage is not None and server._keys is not None
    await server._storage.create_key(record)
    await server._keys.reload()
    return token


async def _serving(tmp_path: Path, certificate: Issued, client_ca: Path | None = None) -> Server:
    tls = TlsConfig(str(certificate.cert), str(certificate.key), str(client_ca or ""))
    server = Server(
        ServerConfig(
            db=f"sqlite:///{tmp_path / 'agentrun.db'}",
            port=0,
            metrics_port=-1,
            web_port=-1,
            auth="keys",
            tls=tls,
        )
    )
    await server.start()
    return server


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "ca")


@pytest.fixture
async def tls_server(tmp_path: Path, authority: Authority) -> AsyncIterator[Server]:
    server = await _serving(tmp_path, authority.issue("localhost", server=True))
    yield server
    await server.shutdown(grace_seconds=1)


def _list(channel: grpc.aio.Channel, token: str | None = None, timeout: float = 5) -> object:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return ingest_grpc.IngestionServiceStub(channel).ListCollections(
        ingest_pb.ListCollectionsRequest(), metadata=metadata, timeout=timeout
    )


async def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(
    tls_server: Server, authority: Authority
) -> None:
    reader = await _key(tls_server, "reader", ["read"])
    address = f"127.0.0.1:{tls_server.port}"
    async with grpc.aio.insecure_channel(address) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list(plain, reader, timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    connection = Connection(address, api_key=reader, tls_ca_file=str(authority.cert))
    async with connection.aio_channel() as channel:
        await _list(channel, reader)
    other = Authority(authority.folder.parent / "other", "another CA")
    async with Connection(address, tls_ca_file=str(other.cert)).aio_channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as untrusted:
            await _list(channel, reader, timeout=3)
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_admits_a_client_certificate_by_its_subjects_key_entry(
    tmp_path: Path, authority: Authority
) -> None:
    server = await _serving(tmp_path, authority.issue("localhost", server=True), authority.cert)
    try:
        await _key(server, "worker-1", ["read"], subject="CN=worker-1")
        address = f"127.0.0.1:{server.port}"
        ca = str(authority.cert)
        async with Connection(address, tls_ca_file=ca).aio_channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # no client certificate
                await _list(channel, timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        known = authority.issue("worker-1", server=False)
        mutual = Connection(
            address, tls_ca_file=ca, tls_cert_file=str(known.cert), tls_key_file=str(known.key)
        )
        async with mutual.aio_channel() as channel:
            await _list(channel)  # the certificate alone: no API key
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await orch_grpc.OrchestratorServiceStub(channel).ApplyWorkflow(
                    orch_pb.ApplyWorkflowRequest(workflow=workflow_pb2.Workflow(name="w"))
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stranger = authority.issue("stranger", server=False)
        unknown = Connection(
            address,
            tls_ca_file=ca,
            tls_cert_file=str(stranger.cert),
            tls_key_file=str(stranger.key),
        )
        async with unknown.aio_channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                await _list(channel)
            assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "CN=stranger" in (unauthenticated.value.details() or "")
    finally:
        await server.shutdown(grace_seconds=1)


async def test_a_rotated_certificate_serves_new_connections_and_open_streams_go_on(
    tmp_path: Path, authority: Authority
) -> None:
    first = authority.issue("localhost", server=True, stem="server")
    server = await _serving(tmp_path, first)
    try:
        admin = await _key(server, "root", ["admin"])
        address = f"127.0.0.1:{server.port}"
        metadata = (("authorization", f"Bearer {admin}"),)
        old = Connection(address, api_key=admin, tls_ca_file=str(authority.cert))
        async with old.aio_channel() as channel:
            orchestrator = orch_grpc.OrchestratorServiceStub(channel)
            workflow = workflow_pb2.Workflow(name="w", stages=[workflow_pb2.Stage(name="s")])
            await orchestrator.ApplyWorkflow(
                orch_pb.ApplyWorkflowRequest(workflow=workflow), metadata=metadata
            )
            stream = orchestrator.Work(metadata=metadata)
            await stream.write(
                orch_pb.WorkRequest(
                    subscribe=orch_pb.Subscribe(
                        workflow="w", stages=[orch_pb.StageSubscription(stage="s")], credits=1
                    )
                )
            )
            assert (await stream.read()).HasField("subscribed")

            # Rotate to a certificate of another CA, in place, as cert-manager would.
            rotated = Authority(tmp_path / "next", "next CA")
            rotated.issue("localhost", server=True, stem="server", folder=first.cert.parent)
            fresh = Connection(address, api_key=admin, tls_ca_file=str(rotated.cert))
            async with fresh.aio_channel() as new_channel:
                await _list(new_channel, admin)
            stale = Connection(address, api_key=admin, tls_ca_file=str(authority.cert))
            async with stale.aio_channel() as stale_channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await _list(stale_channel, admin, timeout=3)

            # The stream opened before still works: a run enqueued now is leased on it.
            ingestion = ingest_grpc.IngestionServiceStub(channel)
            collection = await ingestion.CreateCollection(
                ingest_pb.CreateCollectionRequest(name="c", workflow="w"), metadata=metadata
            )
            run = AgentRun(
                id="r1",
                transcripts={"t": Transcript(messages=[UserMessage(content="hi")])},
                metadata={"scores": {}},
            )
            await ingestion.UploadAgentRuns(
                iter(
                    [
                        ingest_pb.UploadAgentRunsRequest(
                            collection_id=collection.collection.id,
                            agent_runs=[agent_run_to_proto(run)],
                        )
                    ]
                ),
                metadata=metadata,
            )
            async with asyncio.timeout(5):
                leased = await stream.read()
            assert [lease.agent_run.id for lease in leased.leases.leases] == ["r1"]
            stream.cancel()
    finally:
        await server.shutdown(grace_seconds=1)


def _runs(n: int) -> list[AgentRun]:
    return [
        AgentRun(
            id=f"tls-{i}",
            transcripts={"t": Transcript(messages=[UserMessage(content=f"task {i}")])},
            metadata={"scores": {"reward": float(i % 2)}},
        )
        for i in range(n)
    ]


async def test_the_writer_runner_and_cli_work_over_tls_with_keys(
    tls_server: Server, authority: Authority, tmp_path: Path
) -> None:
    admin = await _key(tls_server, "root", ["admin"])
    ingest = await _key(tls_server, "ingest", ["ingest"])
    worker = await _key(tls_server, "worker", ["work"])
    server_url = f"localhost:{tls_server.port}"
    ca = str(authority.cert)

    def set_up() -> None:
        with Client(connection=Connection(server_url, api_key=admin, tls_ca_file=ca)) as client:
            client.apply_workflow(
                workflow_pb2.Workflow(name="grade", stages=[workflow_pb2.Stage(name="score")])
            )
            collection = client.create_collection("tls-runs", workflow="grade").collection
        writer = AgentRunWriter(
            collection.id, connection=Connection(server_url, api_key=ingest, tls_ca_file=ca)
        )
        writer.log_agent_runs(_runs(20))
        summary = writer.finish()
        assert summary.accepted == 20, summary

    await asyncio.to_thread(set_up)
    runner = Runner(
        workflow="grade", connection=Connection(server_url, api_key=worker, tls_ca_file=ca)
    )
    scored: list[str] = []

    @runner.stage("score")
    def score(run: AgentRun) -> None:
        scored.append(run.id)

    summary = await asyncio.to_thread(runner, progress=False)
    assert sorted(scored) == sorted(r.id for r in _runs(20))
    assert summary.completed[("score", "")] == 20

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
    env |= {"AGENTRUN_API_KEY": admin, "AGENTRUN_TLS_CA": ca}
    stats = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agentrun._cli", "stats", "--server", server_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert stats.returncode == 0, stats.stderr
    assert "tls-runs" in stats.stdout and "20" in stats.stdout
    key_file = tmp_path / "worker.key"
    key_file.write_text(worker + "\n")
    denied = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "agentrun._cli",
            "keys",
            "list",
            "--server",
            server_url,
            "--api-key-file",
            str(key_file),
            "--tls-ca",
            ca,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "AGENTRUN_TLS_CA"},
    )
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr, denied.stderr


async def test_the_typescript_client_works_over_tls_with_a_key(
    tls_server: Server, authority: Authority
) -> None:
    node = shutil.which("node")
    if node is None or not (CLIENT / "node_modules").is_dir():
        pytest.skip("node or clients/typescript/node_modules is missing: `make install-ts`")
    admin = await _key(tls_server, "root", ["admin"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
    env |= {
        "AGENTRUN_SERVER": f"localhost:{tls_server.port}",
        "AGENTRUN_API_KEY": admin,
        "AGENTRUN_TLS_CA": str(authority.cert),
    }
    process = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "--test-reporter=spec",
        "test/",
        cwd=CLIENT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    report = output.decode()
    assert process.returncode == 0, report
    assert "skipped 0" in report, report


async def test_under_mtls_health_is_served_on_its_own_port_to_probes_without_a_certificate(
    tmp_path: Path, authority: Authority
) -> None:
    certificate = authority.issue("localhost", server=True, stem="server")
    tls = TlsConfig(str(certificate.cert), str(certificate.key), str(authority.cert))
    server = Server(
        ServerConfig(
            db=f"sqlite:///{tmp_path / 'agentrun.db'}",
            port=0,
            metrics_port=-1,
            web_port=-1,
            health_port=0,
            auth="keys",
            tls=tls,
        )
    )
    await server.start()
    try:
        assert server.health_port not in (0, server.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
            check = await health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unserved:  # health, and nothing else
                await _list(probe, timeout=3)
            assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED
        ca = str(authority.cert)
        async with Connection(f"127.0.0.1:{server.port}", tls_ca_file=ca).aio_channel() as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # the main port: mTLS still
                await health_pb2_grpc.HealthStub(plain).Check(
                    health_pb2.HealthCheckRequest(), timeout=3
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.shutdown(grace_seconds=1)
