"""Cleaning up an always-on service (issue 28): deleting a collection and runs (by id and by
age), refused while a task is leased unless forced (the lease revoked to its worker), a
collection's retention enforced by the server's sweep, the space given back to the file system,
admin scope, key limits and audit lines. On both engines, through real sockets; the CLI as users
run it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    RpcError,
    Transcript,
    WorkflowSpec,
)
from agentrun._convert import agent_run_to_proto
from agentrun.chat import UserMessage
from agentrun.work import Lease, WorkStream
from agentrun_server import Server, ServerConfig
from agentrun_server.auth import new_key
from agentrun_server.ingestion import IngestionLimits
from agentrun_server.storage import NewRun, open_storage

from ..processes import ServerProcess
from ..processes import agentrun_cli as cli

DAY = 86_400.0


def _run(run_id: str, text: str = "question") -> AgentRun:
    return AgentRun(
        id=run_id,
        transcripts={"main": Transcript(messages=[UserMessage(content=text)])},
        metadata=BaseAgentRunMetadata(scores={}),
    )


def _store(url: str, collection_id: str, runs: list[AgentRun]) -> None:
    with AgentRunWriter(collection_id, server_url=url, num_workers=1) as writer:
        writer.log_agent_runs(runs)


@pytest.fixture
async def served(database: str) -> AsyncIterator[tuple[Server, str]]:
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1))
    await server.start()
    yield server, f"127.0.0.1:{server.port}"
    await server.shutdown(grace_seconds=1)


async def test_a_leased_task_refuses_deleting_its_collection_until_forced_which_revokes_it(
    served: tuple[Server, str],
) -> None:
    server, url = served
    client = Client(url)
    spec = WorkflowSpec.model_validate({"name": "wf", "stages": [{"name": "work"}]})
    await asyncio.to_thread(client.apply_workflow, spec.to_proto())
    made = await asyncio.to_thread(client.create_collection, "c", workflow="wf")
    await asyncio.to_thread(_store, url, made.id, [_run(f"r{i}") for i in range(3)])
    revoked: list[tuple[str, str]] = []
    told = asyncio.Event()

    def on_revoked(lease: Lease, reason: str) -> None:
        revoked.append((lease.agent_run.id, reason))
        told.set()

    async with WorkStream(url, "wf", ["work"], credits=1, on_revoked=on_revoked) as stream:
        lease = await asyncio.wait_for(anext(stream), 10)
        with pytest.raises(RpcError) as refused:
            await asyncio.to_thread(client.delete_collection, name="c")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "1 task(s) of 1 run(s) to delete are leased (1 in wf/work" in str(refused.value)
        assert "force" in str(refused.value)
        assert (await asyncio.to_thread(client.get_collection, made.id)).run_count == 3

        deletion = await asyncio.to_thread(client.delete_collection, name="c", force=True)
        assert (deletion.deleted_run_count, deletion.deleted_task_count) == (3, 3)
        assert deletion.revoked_lease_count == 1
        await asyncio.wait_for(told.wait(), 10)
        assert revoked == [(lease.agent_run.id, "cancelled")]
    with pytest.raises(RpcError) as gone:
        await asyncio.to_thread(client.get_collection, made.id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND
    backlog = await asyncio.to_thread(client.backlog, "wf")
    assert [(s.ready_count, s.leased_count, s.done_count) for s in backlog] == [(0, 0, 0)]
    again = await asyncio.to_thread(client.create_collection, "c", workflow="wf")
    assert again.created and again.id != made.id and again.run_count == 0
    with pytest.raises(RpcError) as twice:
        await asyncio.to_thread(client.delete_collection, made.id)
    assert twice.value.code == grpc.StatusCode.NOT_FOUND
    assert (
        server.registry.get_sample_value(
            "agentrun_ingest_deleted_runs_total", {"reason": "request"}
        )
        == 3
    )
    client.close()


async def test_runs_by_id_and_by_age_and_the_selections_that_make_no_sense(
    served: tuple[Server, str],
) -> None:
    _, url = served
    client = Client(url)
    made = await asyncio.to_thread(client.create_collection, "c")
    await asyncio.to_thread(_store, url, made.id, [_run(f"r{i}") for i in range(5)])
    deletion = await asyncio.to_thread(client.delete_runs, ["r0", "r1", "nope", "r0"])
    assert (deletion.deleted_run_count, deletion.not_found_agent_run_ids) == (2, ["nope"])
    cut = await asyncio.to_thread(lambda: client.get_run("r4"))
    assert cut.id == "r4"
    deletion = await asyncio.to_thread(
        lambda: client.delete_runs(collection_id=made.id, ingested_before=datetime.now(UTC))
    )
    assert deletion.deleted_run_count == 3
    assert (await asyncio.to_thread(client.get_collection, made.id)).run_count == 0
    for wrong, field in (
        ({}, "agent_run_ids"),
        ({"agent_run_ids": ["r"], "collection_id": made.id}, "agent_run_ids"),
        ({"collection_id": made.id}, "ingested_before"),
        ({"agent_run_ids": ["x"] * 1001}, "agent_run_ids"),
    ):
        with pytest.raises(RpcError) as refused:
            await asyncio.to_thread(lambda w=wrong: client.delete_runs(**w))  # type: ignore[misc]
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, wrong
        assert field in str(refused.value), (wrong, refused.value)
    with pytest.raises(RpcError) as unknown:
        await asyncio.to_thread(
            lambda: client.delete_runs(collection_id="no-such", ingested_before=datetime.now(UTC))
        )
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RpcError) as too_long:
        await asyncio.to_thread(lambda: client.update_collection(made.id, retention_days=40_000))
    assert too_long.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "retention_days: 40,000 days, over the limit of 36,500" in str(too_long.value)
    client.close()


async def test_runs_past_their_collection_retention_are_swept_away(database: str) -> None:
    # Runs stored ten and one days ago, written before the server starts (the storage takes
    # the caller's times); the server's sweep deletes what its collection keeps no longer.
    if database.startswith("sqlite"):
        storage = await open_storage(database)
    else:
        from agentrun_server.storage.postgres import PostgresStorage

        storage = PostgresStorage(database, caller_clock=True)
        await storage.open()
    now = time.time()
    weekly, _ = await storage.create_collection("weekly", "", "", now - 20 * DAY, retention_days=7)
    kept, _ = await storage.create_collection("kept", "", "", now - 20 * DAY)
    for collection in (weekly, kept):
        for age in (10, 1):
            run_id = f"{collection.name}-{age}"
            run = NewRun(run_id, None, agent_run_to_proto(_run(run_id)).SerializeToString())
            await storage.insert_runs(collection.id, [run], now - age * DAY)
    await storage.close()
    limits = IngestionLimits(retention_sweep_seconds=0.2)
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, limits=limits))
    await server.start()
    try:
        client = Client(f"127.0.0.1:{server.port}")
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(client.get_collection, weekly.id)).run_count != 1:
            assert time.monotonic() < deadline, "the sweep deleted nothing"
            await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(client.get_collection, kept.id)).run_count == 2
        with pytest.raises(RpcError):
            await asyncio.to_thread(client.get_run, "weekly-10")
        assert (await asyncio.to_thread(client.get_run, "weekly-1")).id == "weekly-1"
        assert (
            server.registry.get_sample_value(
                "agentrun_ingest_deleted_runs_total", {"reason": "retention"}
            )
            == 1
        )
        # A retention set later applies at the next sweep.
        updated = await asyncio.to_thread(
            lambda: client.update_collection(name="kept", retention_days=5)
        )
        assert updated.retention_days == 5
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(client.get_collection, kept.id)).run_count != 1:
            assert time.monotonic() < deadline, "the new retention was not applied"
            await asyncio.sleep(0.1)
        client.close()
    finally:
        await server.shutdown(grace_seconds=1)


async def test_deleting_takes_the_admin_scope_and_stays_within_a_key_s_limits(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1, auth="keys"))
    await server.start()
    caplog.set_level("INFO", logger="agentrun.audit")
    try:
        assert server._storage is not None and server._keys is not None
        tokens = {}
        for name, scopes, collections in (
            ("root", ["admin"], []),
            ("ci", ["ingest", "read"], []),
            ("ops-a", ["admin"], ["a"]),
        ):
            record, tokens[name] = new_key(name, scopes, collections=collections)
            await server._storage.create_key(record)
        await server._keys.reload()
        url = f"127.0.0.1:{server.port}"

        def client(key: str) -> Client:
            return Client(url, api_key=tokens[key])

        a = await asyncio.to_thread(lambda: client("root").create_collection("a"))
        b = await asyncio.to_thread(lambda: client("root").create_collection("b"))
        for refused_by, call in (
            ("ci", lambda: client("ci").delete_collection(a.id)),
            ("ci", lambda: client("ci").delete_runs(["x"])),
            ("ci", lambda: client("ci").update_collection(a.id, retention_days=1)),
            ("ops-a", lambda: client("ops-a").delete_collection(b.id)),
        ):
            with pytest.raises(RpcError) as refused:
                await asyncio.to_thread(call)
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, refused_by
        await asyncio.to_thread(lambda: client("ops-a").update_collection(a.id, retention_days=3))
        await asyncio.to_thread(lambda: client("ops-a").delete_collection(a.id))
    finally:
        await server.shutdown(grace_seconds=1)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "agentrun.audit"]
    assert [(line["audit"], line["key"]) for line in lines] == [
        ("collections.update", "ops-a"),
        ("collections.delete", "ops-a"),
    ]
    assert lines[0]["retention_days"] == 3
    assert (lines[1]["collection"], lines[1]["runs"]) == ("a", 0)


def _pages(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA page_count").fetchone()[0])


def test_the_cli_deletes_asks_first_and_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "agentrun.db"
    with ServerProcess(path) as server:
        made = cli(server, "collections", "create", "big", "--retention-days", "30")
        assert made.returncode == 0, made.stderr
        assert "kept 30 days" in made.stdout
        with Client(server.url) as client:
            collection = client.get_collection(name="big")
        _store(server.url, collection.id, [_run(f"r{i}", "x" * 50_000) for i in range(120)])
        full = _pages(path)

        by_id = cli(server, "runs", "delete", "r0", "r1", "nope")
        assert by_id.returncode == 0, by_id.stderr
        assert by_id.stdout.splitlines() == [
            "2 runs and 0 tasks deleted",
            "  no run 'nope' (deleted before, or never stored)",
        ]
        neither = cli(server, "runs", "delete")
        assert neither.returncode == 2
        assert "--collection C --older-than AGE" in neither.stderr
        unasked = cli(server, "runs", "delete", "--collection", "big", "--older-than", "0s")
        assert unasked.returncode == 1
        assert "add --yes to confirm" in unasked.stderr and "nothing was deleted" in unasked.stderr
        young = cli(server, "runs", "delete", "--collection", "big", "--older-than", "1d", "--yes")
        assert young.stdout.strip() == "0 runs and 0 tasks deleted"
        listed = json.loads(cli(server, "collections", "list", "--json").stdout)
        assert [(c["name"], c["run_count"], c["retention_days"]) for c in listed] == [
            ("big", 118, 30)
        ]

        unasked = cli(server, "collections", "delete", "big")
        assert unasked.returncode == 1 and "add --yes" in unasked.stderr
        deleted = cli(server, "collections", "delete", "big", "--yes")
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.strip() == "collection 'big' deleted: 118 runs and 0 tasks deleted"
        # About 6 MB of runs, given back to the file system as they went.
        assert _pages(path) < full - 5_000_000 // 4096
        assert "(no collections)" in cli(server, "collections", "list").stdout
        missing = cli(server, "collections", "delete", "big", "--yes")
        assert missing.returncode == 1 and "no collection named 'big'" in missing.stderr


def test_migrate_vacuum_switches_an_older_file_to_giving_space_back(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # made before incremental vacuum was the default
        db.execute("PRAGMA journal_mode = WAL")
    done = subprocess.run(
        [sys.executable, "-m", "agentrun._cli", "migrate", "--db", f"sqlite:///{path}", "--vacuum"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "vacuumed" in done.stdout and "give their space back from now on" in done.stdout
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
