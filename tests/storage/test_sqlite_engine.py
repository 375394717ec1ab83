"""The SQLite engine: the hot path taking turns with the storage thread and with other
processes, and statements kept under SQLite's parameter limit."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agentrun_server.storage import (
    AckCode,
    ClaimRequest,
    Completion,
    EventStatus,
    Folded,
    InsertStatus,
    NewEvent,
    NewRun,
    SqliteStorage,
    StageDef,
    WorkflowDef,
    open_storage,
)
from agentrun_server.storage._procedures import live as live_procedures
from agentrun_server.storage._procedures import runs as runs_procedures
from agentrun_server.storage._store import HOT_UPLOAD_BYTES, HOT_UPLOAD_RUNS

WORKFLOW = WorkflowDef(
    "w",
    (
        StageDef("a", {"next": "b", "stop": None}, max_attempts=2, initial_backoff_seconds=0),
        StageDef("b"),
    ),
)


async def test_settling_and_claiming_take_turns_with_ingestion(tmp_path: Path) -> None:
    # Claims and completions run on the event loop's thread, inserts on the storage thread: the
    # two must take turns on the write lock without either failing or losing a task.
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WorkflowDef("one", (StageDef("a"),)), 1.0)
        collection, _ = await storage.create_collection("c", "", "one", 1.0)

        async def ingest() -> None:
            for batch in range(20):
                runs = [NewRun(f"r{batch}-{i}", None, b"x" * 1000) for i in range(100)]
                await storage.insert_runs(collection.id, runs, 2.0)

        done: list[int] = []

        async def work() -> None:
            while len(done) < 2000:
                leased = await storage.claim(ClaimRequest("s", "one", {"a": 50}, 50, None), 3.0)
                acks = await storage.complete(
                    [Completion(t.task_id, t.lease_id, "") for t in leased], 3.0
                )
                assert all(ack.code is AckCode.OK for ack in acks)
                done.extend(t.task_id for t in leased)
                await asyncio.sleep(0)

        await asyncio.wait_for(asyncio.gather(ingest(), work()), 60)
        assert len(done) == len(set(done)) == 2000
        (stage,) = await storage.backlog("one", 4.0)
        assert (stage.done, stage.ready, stage.leased) == (2000, 0, 0)
    finally:
        await storage.close()


async def test_a_write_lock_held_by_another_process_never_blocks_the_event_loop(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite"
    storage = await open_storage(f"sqlite:///{db}")
    holder = None
    try:
        await storage.put_workflow(WORKFLOW, 1.0)
        collection, _ = await storage.create_collection("c", "", "w", 1.0)
        await storage.insert_runs(collection.id, [NewRun("r1", None, b"1")], 1.0)
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLD_WRITE_LOCK,
            str(db),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert holder.stdout is not None and holder.stdin is not None
        assert await holder.stdout.readline() == b"held\n"
        claim = asyncio.create_task(storage.claim(ClaimRequest("s", "w", {"a": 1}, 1, None), 2.0))
        ticks = []
        for _ in range(30):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < 0.1, f"the event loop stalled {max(gaps):.3f} s"
        assert not claim.done()  # waiting for the lock, on the storage thread
        holder.stdin.write(b"\n")
        await holder.stdin.drain()
        (leased,) = await asyncio.wait_for(claim, 10)
        assert leased.run_data == b"1"
    finally:
        if holder is not None:
            if holder.returncode is None:
                holder.kill()
            await holder.communicate()  # reaps it and closes its pipes
        await storage.close()


async def test_a_small_upload_runs_on_the_event_loop_and_a_big_one_on_the_storage_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run or two (or a live run's next events) skip the two thread hops (the way from an
    # agent's upload to its task's lease); a batch's transaction, or a finish folding a whole
    # run, would hold the event loop for too long.
    threads: list[tuple[str, int]] = []

    def recording(module: Any, name: str) -> None:
        real = getattr(module, name)

        async def procedure(*args: Any, **kwargs: Any) -> Any:
            threads.append((name, threading.get_ident()))
            return await real(*args, **kwargs)

        monkeypatch.setattr(module, name, procedure)

    recording(runs_procedures, "insert_runs")
    recording(live_procedures, "append_events")
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WORKFLOW, 1.0)
        collection, _ = await storage.create_collection("c", "", "w", 1.0)
        small = [NewRun("r1", None, b"x" * 1000)]
        many = [NewRun(f"m{i}", None, b"x") for i in range(HOT_UPLOAD_RUNS + 1)]
        large = [NewRun("big", None, b"x" * (HOT_UPLOAD_BYTES + 1))]
        for batch in (small, many, large):
            outcomes = await storage.insert_runs(collection.id, batch, 2.0)
            assert {o.status for o in outcomes} == {InsertStatus.ACCEPTED}
        (stage, _) = await storage.backlog("w", 3.0)
        assert stage.ready == 1 + len(many) + 1  # each entered the workflow all the same

        def fold(run_id: str, parts: Sequence[bytes]) -> Folded:
            return Folded(b"".join(parts), None, ())

        for sequence, finish in ((1, False), (2, True)):
            patch = f"part {sequence}".encode()
            event = NewEvent("live", sequence, collection.id, patch, finish)
            (outcome,) = await storage.append_events([event], fold, 1 << 20, 4.0)
            assert outcome.status is EventStatus.STORED
        loop = threading.get_ident()
        assert [(name, thread == loop) for name, thread in threads] == [
            ("insert_runs", True),
            ("insert_runs", False),
            ("insert_runs", False),
            ("append_events", True),
            ("append_events", False),
        ]
    finally:
        await storage.close()


HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


async def test_a_claim_of_more_tasks_than_sqlite_takes_parameters_leases_them_all(
    tmp_path: Path,
) -> None:
    # 20,000 leases in one claim: over SQLite's 32,766 parameters at two per task, were it one
    # statement (credits are the worker's to choose; SqliteStorage pins that limit on any build).
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await storage.put_workflow(WorkflowDef("one", (StageDef("a"),)), 1.0)
        collection, _ = await storage.create_collection("c", "", "one", 1.0)
        for start in range(0, 20_000, 1000):
            runs = [NewRun(f"r{i}", None, b"x") for i in range(start, start + 1000)]
            await storage.insert_runs(collection.id, runs, 1.0)
        leased = await storage.claim(ClaimRequest("s", "one", {"a": 20_000}, 20_000, None), 2.0)
        assert len({t.task_id for t in leased}) == 20_000
        assert {t.run_data for t in leased} == {b"x"}
        # As many ids named at once: cancel (and redrive) look them up in slices too.
        count, ended = await storage.cancel("", "", [t.task_id for t in leased], 3.0)
        assert count == len(ended) == 20_000  # every one leased: each lease ended is reported
        assert {e.lease_id for e in ended} == {t.lease_id for t in leased}
    finally:
        await storage.close()


def _pages(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA page_count").fetchone()[0])


async def _fill_and_delete(storage: SqliteStorage, name: str, runs: int) -> None:
    collection, _ = await storage.create_collection(name, "", "", 1.0)
    await storage.insert_runs(
        collection.id,
        [NewRun(f"{name}{i}", None, os.urandom(20_000)) for i in range(runs)],
        1.0,
    )
    while (await storage.delete_collection(collection.id, False, 100, 2.0)).more:
        pass


async def test_a_new_file_gives_deleted_runs_space_back(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    storage = await open_storage(f"sqlite:///{path}")
    assert isinstance(storage, SqliteStorage)
    try:
        await _fill_and_delete(storage, "big", 300)  # about 6 MB
        full = _pages(path)
        given = await storage.reclaim_space(1 << 30)
        assert given > 5_000_000
        assert _pages(path) < full - 5_000_000 // 4096
        assert await storage.reclaim_space(1 << 30) == 0
    finally:
        await storage.close()


async def test_an_older_file_keeps_the_space_until_vacuumed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # a file made before incremental vacuum was the default
        db.execute("PRAGMA journal_mode = WAL")
    storage = await open_storage(f"sqlite:///{path}")
    assert isinstance(storage, SqliteStorage)
    try:
        await _fill_and_delete(storage, "a", 300)
        with caplog.at_level(logging.WARNING):
            assert await storage.reclaim_space(1 << 30) == 0
            assert await storage.reclaim_space(1 << 30) == 0
        told = [r.getMessage() for r in caplog.records if "migrate --vacuum" in r.getMessage()]
        assert len(told) == 1 and re.search(r"keeps [56] MB", told[0])
        assert await storage.vacuum() > 5_000_000
        await _fill_and_delete(storage, "b", 300)
        assert await storage.reclaim_space(1 << 30) > 5_000_000
    finally:
        await storage.close()


def _wal_bytes(db: Path) -> int:
    return os.path.getsize(f"{db}-wal")


async def test_the_wal_starts_over_under_uploads_that_never_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpointer restarts a WAL past its limit. Its RESTART waits for the write lock,
    # which a storage thread committing batch after batch used to take back every time: the
    # WAL grew with the upload (522 MB beside a 64 MB limit). Here the limit is 1 MB and the
    # uploads never pause; the WAL must start over, and stay near its limit.
    from agentrun_server.storage.sqlite import _engine

    monkeypatch.setattr(_engine, "WAL_LIMIT_BYTES", 1024 * 1024)
    monkeypatch.setattr(_engine, "WAL_CHECK_SECONDS", 0.02)
    db = tmp_path / "db.sqlite"
    storage = await open_storage(f"sqlite:///{db}")
    try:
        collection, _ = await storage.create_collection("c", "", "", 1.0)
        sizes: list[int] = []
        batches = itertools.count()
        stop = time.monotonic() + 3.0

        async def upload() -> None:  # three at once: the storage thread always has a next
            while time.monotonic() < stop:
                batch = next(batches)
                runs = [NewRun(f"r{batch}-{i}", None, os.urandom(8192)) for i in range(200)]
                await storage.insert_runs(collection.id, runs, 2.0)
                sizes.append(_wal_bytes(db))

        await asyncio.gather(upload(), upload(), upload())
        batch = next(batches)
        largest = max(sizes)
        restarts = sum(later < earlier for earlier, later in itertools.pairwise(sizes))
        written = batch * 200 * 8192
        assert written > 20 * 1024 * 1024, f"only {written:,} bytes written: too slow to tell"
        assert restarts >= 3, f"the WAL never started over ({largest:,} bytes at most)"
        assert largest < written / 10, f"the WAL grew to {largest:,} bytes of {written:,} written"
    finally:
        await storage.close()
