"""Schema migrations: the numbered scripts of `storage/sql/postgres`, applied in order, once.

`schema_migrations` records each version applied. Replicas that start together never race: the
migrator holds a PostgreSQL advisory lock while it reads what is applied and applies the rest, each
script in its own transaction (DDL is transactional here), so a failed script leaves nothing half
done. `agentrun migrate --db URL` runs this on its own, for deployments that migrate first.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable

import psycopg

MIGRATION_LOCK = 7_145_093_861_212_402_811
"""The advisory lock key migrations hold (any 64-bit number; this one is agentrun's)."""


def scripts() -> list[tuple[int, Traversable]]:
    """(version, script) of every migration, in order."""
    folder = resources.files("agentrun_server.storage") / "sql" / "postgres"
    found = [(int(p.name.split("_", 1)[0]), p) for p in folder.iterdir() if p.name.endswith(".sql")]
    return sorted(found, key=lambda item: item[0])


async def migrate(url: str, target: int | None = None) -> list[int]:
    """Apply the scripts newer than the database's version, up to `target` (None: all); return
    the versions applied now.

    Raises:
        psycopg.Error: the database is unreachable or a script failed (its transaction rolled
            back; the versions before it stay applied).
    """
    applied_now = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cursor = await conn.execute("SELECT version FROM schema_migrations")
            applied = {row[0] for row in await cursor.fetchall()}
            for version, script in scripts():
                if version in applied or (target is not None and version > target):
                    continue
                async with conn.transaction():
                    await conn.execute(script.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
                    )
                applied_now.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now
