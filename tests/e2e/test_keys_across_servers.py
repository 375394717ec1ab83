"""API keys made and revoked with `agentrun keys`, seen by every server process on the database:
the first admin key made with --db, the rest through a server, a revocation through one server
refused by another within a second, its open Work stream ended."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.v1 import orchestrator_service_pb2_grpc as pb_grpc

from ..processes import ServerProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def agentrun(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
    if api_key:
        env["AGENTRUN_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-m", "agentrun._cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def created_token(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    (token,) = done.stdout.split()  # the token alone on stdout
    assert token.startswith("ark_")
    assert "shown this once" in done.stderr
    return token


async def test_a_key_revoked_through_one_server_stops_on_another_within_a_second(
    database: str,
) -> None:
    db = url = database  # each engine: a SQLite file shared by two processes, or PostgreSQL
    admin = created_token(agentrun("keys", "create", "root", "--scope", "admin", "--db", url))
    with (
        ServerProcess(db, None, "--auth", "keys") as one,
        ServerProcess(db, None, "--auth", "keys") as other,
    ):
        refused = agentrun("stats", "--server", one.url)
        assert refused.returncode == 1
        assert "UNAUTHENTICATED" in refused.stderr and "AGENTRUN_API_KEY" in refused.stderr
        applied = agentrun(
            "workflow", "apply", str(EXAMPLES / "grading.yaml"), "--server", one.url, api_key=admin
        )
        assert applied.returncode == 0, applied.stderr
        worker = created_token(
            agentrun(
                "keys",
                "create",
                "grader",
                "--scope",
                "work",
                "--scope",
                "read",
                "--workflow",
                "grading",
                "--server",
                one.url,
                api_key=admin,
            )
        )
        denied = agentrun("keys", "list", "--server", other.url, api_key=worker)
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
        assert "'admin'" in denied.stderr

        metadata = (("authorization", f"Bearer {worker}"),)
        async with grpc.aio.insecure_channel(other.url) as channel:
            orchestrator = pb_grpc.OrchestratorServiceStub(channel)
            stream = orchestrator.Work(metadata=metadata)
            await stream.write(
                pb.WorkRequest(
                    subscribe=pb.Subscribe(
                        workflow="grading",
                        stages=[pb.StageSubscription(stage="triage")],
                        credits=1,
                    )
                )
            )
            assert (await stream.read()).HasField("subscribed")
            await orchestrator.ListWorkflows(pb.ListWorkflowsRequest(), metadata=metadata)

            revoked = await asyncio.to_thread(
                agentrun, "keys", "revoke", "grader", "--server", one.url, api_key=admin
            )
            assert revoked.returncode == 0, revoked.stderr
            started = time.monotonic()
            while True:
                try:
                    await orchestrator.ListWorkflows(pb.ListWorkflowsRequest(), metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    break
                assert time.monotonic() - started < 1.0, "still accepted a second after revoking"
                await asyncio.sleep(0.02)
            # The Work stream opened with it ends too.
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(2):
                    while (message := await stream.read()) is not grpc.aio.EOF:
                        assert not message.HasField("leases")
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (ended.value.details() or "")
        # Last use is written coarsely (each minute), and at a graceful stop.
        assert one.terminate() == 0 and other.terminate() == 0

    listed = agentrun("keys", "list", "--db", url)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {"grader", "root"}
    assert "workflow grading" in rows["grader"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert rows["grader"].count(today) == 3  # created, last used, revoked
    assert rows["root"].count(today) == 2  # created, last used; never revoked


def test_keys_made_on_the_database_are_audited_and_may_expire(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agentrun.db'}"
    made = agentrun("keys", "create", "ci", "--scope", "ingest", "--expires", "90d", "--db", url)
    created_token(made)
    line = next(line for line in made.stderr.splitlines() if '"audit"' in line)
    audit = json.loads(line[line.index("{") :])
    assert (audit["audit"], audit["name"], audit["via"], audit["key"]) == (
        "keys.create",
        "ci",
        "database",
        "-",
    )
    assert 89 * 86400 < audit["expires_at"] - time.time() <= 90 * 86400
    listed = agentrun("keys", "list", "--db", url)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert "EXPIRES" in header and row.split()[0] == "ci"
    revoked = agentrun("keys", "revoke", "ci", "--db", url)
    assert '"audit": "keys.revoke"' in revoked.stderr
    past = agentrun(
        "keys", "create", "late", "--scope", "read", "--expires", "2001-01-01", "--db", url
    )
    assert past.returncode == 2 and "not in the future" in past.stderr
