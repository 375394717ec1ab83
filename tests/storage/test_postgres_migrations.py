"""PostgreSQL migrations: replicas starting together apply each migration once, under the
advisory lock; a database at the latest version gets nothing more."""

from __future__ import annotations

import asyncio

import psycopg

from agentrun_server.storage.postgres import migrate
from agentrun_server.storage.postgres._migrate import scripts

from ..postgres import fresh_database


async def test_replicas_migrating_at_once_apply_each_migration_once() -> None:
    with fresh_database() as url:
        applied = await asyncio.gather(*(migrate(url) for _ in range(4)))
        latest = [version for version, _ in scripts()]
        assert sorted(v for versions in applied for v in versions) == latest  # once each
        assert await migrate(url) == []
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                ).fetchall()
            }
        assert [r[0] for r in rows] == latest
        assert {"tasks", "agent_runs", "collections", "task_counts", "servers"} <= tables


# A migration that has landed is never edited (databases out there have run it): add a new one.
LANDED = {
    1: "0675935f0fd5bddbd333e5ef3278333f3841601833ce03cc23656233cd30eca0",
}


def test_landed_migrations_are_never_edited() -> None:
    import hashlib

    found = {v: hashlib.sha256(script.read_bytes()).hexdigest() for v, script in scripts()}
    assert {v: found[v] for v in LANDED} == LANDED
    assert sorted(found) == list(range(1, len(found) + 1))  # numbered without gaps
