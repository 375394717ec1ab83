"""SQLite migrations: a database of the first release, with data in it, upgrades to today's
schema, equal to a fresh database's, its data kept and its new counts right."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from agentrun_server.storage import SqliteStorage, TaskState
from agentrun_server.storage.sqlite._migrate import scripts

# A migration that has landed is never edited (databases out there have run it): add a new one.
LANDED = {
    1: "ef0f1a63ea7d4fb95fae52131acc847ce9411ea4fba5a474c71ca72e83d56711",
    2: "14f8aa5f0d0d8805b57e2a3951ef26efa40a564c55af2b93b3ed3a535d542d62",
}


def test_landed_migrations_are_never_edited() -> None:
    found = {
        version: hashlib.sha256(script.read_bytes()).hexdigest() for version, script in scripts()
    }
    assert {v: found[v] for v in LANDED} == LANDED
    assert sorted(found) == list(range(1, len(found) + 1))  # numbered without gaps


def schema(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
        (version,) = db.execute("PRAGMA user_version").fetchone()
    return [*rows, ("user_version", str(version), "")]


FIRST_RELEASE_DATA = """
INSERT INTO collections (id, name, description, workflow, created_at) VALUES
    ('c1', 'one', '', 'w', 1), ('c2', 'two', '', '', 1);
INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data) VALUES
    ('r1', 'c1', NULL, 1, 1, x'01'), ('r2', 'c1', NULL, 1, 1, x'02'),
    ('r3', 'c1', NULL, 1, 1, x'03'), ('r4', 'c2', NULL, 1, 1, x'04');
INSERT INTO workflows (name, version, definition, updated_at) VALUES ('w', 1,
    '[{"name": "a", "pathways": [["next", "b"]], "max_attempts": 4, "initial_backoff_seconds": 1.0,
       "max_backoff_seconds": 60.0, "lease_seconds": 300.0},
      {"name": "b", "pathways": [], "max_attempts": 4, "initial_backoff_seconds": 1.0,
       "max_backoff_seconds": 60.0, "lease_seconds": 300.0}]', 1);
INSERT INTO tasks (id, workflow, stage, agent_run_id, collection_id, state, max_attempts,
                   created_at, ready_at, lease_id, lease_deadline, session_id) VALUES
    (1, 'w', 'a', 'r1', 'c1', 'done', 4, 1, 1, 'l1', NULL, NULL),
    (2, 'w', 'b', 'r1', 'c1', 'leased', 4, 1, 1, 'l2', 999, 's'),
    (3, 'w', 'a', 'r2', 'c1', 'dead', 4, 1, 1, 'l3', NULL, NULL),
    (4, 'w', 'a', 'r2', 'c1', 'ready', 4, 1, 1, NULL, NULL, NULL),
    (5, 'w', 'a', 'r2', 'c1', 'ready', 4, 2, 2, NULL, NULL, NULL),
    (6, 'w', 'a', 'r3', 'c1', 'cancelled', 4, 1, 1, NULL, NULL, NULL);
"""


async def test_a_first_release_database_upgrades_to_a_fresh_ones_schema(tmp_path: Path) -> None:
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    first = SqliteStorage(str(old))
    await first.open(schema_version=1)
    await first.close()
    with sqlite3.connect(old) as db:
        db.executescript(FIRST_RELEASE_DATA)

    storage = SqliteStorage(str(old))
    await storage.open()  # migrates
    try:
        new = SqliteStorage(str(fresh))
        await new.open()
        await new.close()
        assert schema(old) == schema(fresh)
        assert (await storage.get_collection(id="c1")).run_count == 3
        assert (await storage.get_collection(id="c2")).run_count == 1
        # A redrive had left run r2 with two ready tasks: the newer is cancelled.
        assert (await storage.get_task(5)).state is TaskState.CANCELLED
        assert (await storage.get_task(4)).state is TaskState.READY
        a, b = await storage.backlog("w", 10.0)
        assert (a.done, a.dead, a.ready, a.cancelled) == (1, 1, 1, 2)
        assert (b.leased, b.done) == (1, 0)
    finally:
        await storage.close()
    again = SqliteStorage(str(old))
    await again.open()  # nothing left to apply
    await again.close()
    assert schema(old) == schema(fresh)
