"""Schema migrations: the numbered scripts of `storage/sql/sqlite`, applied in order, once.

The database's `PRAGMA user_version` is the number of the last script applied. All pending
scripts run in one write transaction, so processes that open the file together never race: the
second waits for the first, then finds nothing to do.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from importlib.abc import Traversable

from agentrun_server.storage.sqlite._engine import transaction


def scripts() -> list[tuple[int, Traversable]]:
    """(version, script) of every migration, in order."""
    folder = resources.files("agentrun_server.storage") / "sql" / "sqlite"
    found = [(int(p.name.split("_", 1)[0]), p) for p in folder.iterdir() if p.name.endswith(".sql")]
    return sorted(found, key=lambda item: item[0])


def migrate(db: sqlite3.Connection, target: int | None = None) -> int:
    """Apply the scripts newer than the database's version, up to `target` (None: all); return
    the version reached."""
    with transaction(db):
        current: int = db.execute("PRAGMA user_version").fetchone()[0]
        for version, script in scripts():
            if version <= current or (target is not None and version > target):
                continue
            statement = ""
            for line in script.read_text().splitlines(keepends=True):
                statement += line
                if sqlite3.complete_statement(statement):
                    db.execute(statement)
                    statement = ""
            db.execute(f"PRAGMA user_version = {version}")
            current = version
        return current
