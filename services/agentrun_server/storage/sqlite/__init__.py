"""SQLite storage (WAL): the embedded default. `SqliteStorage` is the one `Store` run on SQLite:
each procedure runs on the connection the engine picks (the storage thread for writes, the event
loop for the Work stream's small batches and small uploads, the reader thread for reads) with the
statements of `_statements`."""

from __future__ import annotations

import functools
import logging
import sqlite3

from agentrun_server.storage._notifier import LocalNotifier, Notifier, PollingNotifier
from agentrun_server.storage._store import P, Procedure, Store, T
from agentrun_server.storage._types import SqliteConfig
from agentrun_server.storage.sqlite._engine import Engine, run_to_end, transaction
from agentrun_server.storage.sqlite._migrate import migrate
from agentrun_server.storage.sqlite._statements import SqliteStatements

__all__ = ["SqliteStorage"]

_log = logging.getLogger(__name__)


def _in_transaction(
    db: sqlite3.Connection, procedure: Procedure[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    with transaction(db):
        return run_to_end(procedure(SqliteStatements(db), *args, **kwargs))


def _reading(
    db: sqlite3.Connection, procedure: Procedure[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    return run_to_end(procedure(SqliteStatements(db), *args, **kwargs))


INCREMENTAL = 2
"""`PRAGMA auto_vacuum`'s value for incremental vacuum."""


def _reclaim(db: sqlite3.Connection, max_bytes: int) -> tuple[int, int]:
    """(bytes given back, bytes left free in the file); nothing given back unless the file is
    in incremental vacuum mode."""
    page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    before = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    if before and int(db.execute("PRAGMA auto_vacuum").fetchone()[0]) == INCREMENTAL:
        # executescript steps the pragma to its end (execute frees one page per step); it runs
        # in its own transaction, as this connection holds none between calls.
        db.executescript(f"PRAGMA incremental_vacuum({max(1, max_bytes // page_size)})")
    after = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    return (before - after) * page_size, after * page_size


def _vacuum(db: sqlite3.Connection) -> int:
    def size() -> int:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        return int(pages) * int(db.execute("PRAGMA page_size").fetchone()[0])

    before = size()
    db.execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")
    db.execute("VACUUM")
    return before - size()


class SqliteStorage(Store):
    """Storage in one SQLite file; see `Storage` for the contract of each method.

    `path` ":memory:" keeps everything in one connection (tests only).
    """

    def __init__(self, path: str, config: SqliteConfig | None = None) -> None:
        super().__init__()
        self.path = path
        self._engine = Engine(path, (config or SqliteConfig()).synchronous)
        self._told_vacuum = False

    async def open(self, schema_version: int | None = None) -> None:
        """Open the file (creating it) and apply pending migrations (up to `schema_version`;
        None: all of them, as the server does)."""
        await self._engine.open(functools.partial(migrate, target=schema_version))

    async def close(self) -> None:
        await self._engine.close()

    def notifier(self) -> Notifier:
        """The data version and the revocations table, polled (one process in memory: local)."""
        return LocalNotifier() if self._engine.in_memory else PollingNotifier(self)

    async def _write(self, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._engine.write(_in_transaction, procedure, *args, **kwargs)

    async def _hot(
        self, tasks: int, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self._engine.hot(tasks, _in_transaction, procedure, *args, **kwargs)

    async def _read(self, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._engine.read(_reading, procedure, *args, **kwargs)

    async def reclaim_space(self, max_bytes: int) -> int:
        """See `Storage.reclaim_space`. A file made before incremental vacuum was the default
        keeps the space (new runs reuse it): said once, with what gives it back."""
        given, left = await self._engine.write(_reclaim, max_bytes)
        if left and not given and not self._told_vacuum:
            self._told_vacuum = True
            _log.warning(
                "%s keeps %d MB that deleted runs freed (new runs reuse it); to give such space "
                "back to the file system as runs are deleted, stop the servers and run "
                "`agentrun migrate --vacuum --db sqlite:///%s` once",
                self.path,
                left // 2**20,
                self.path,
            )
        return given

    async def vacuum(self) -> int:
        """Rewrite the file compactly, in incremental vacuum mode from then on (so deletions
        give their space back); the bytes it shrank by. It takes the whole database for as long
        as it copies it, and needs as much free disk: run it with the servers stopped."""
        return await self._engine.write(_vacuum)

    async def events_landed_after(self, after_id: int) -> tuple[int, list[str] | None]:
        """The newest event's row id, and the runs with events after `after_id` (for the
        `PollingNotifier`; None: too many to name)."""
        return await self._engine.read(
            lambda db: SqliteStatements(db).events_landed_after(after_id)
        )

    async def change_marker(self) -> int | None:
        if self._engine.in_memory:
            return None
        return await self._engine.read(lambda db: SqliteStatements(db).data_version())
