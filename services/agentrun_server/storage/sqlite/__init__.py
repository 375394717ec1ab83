"""SQLite storage (WAL): the embedded default. `SqliteStorage` is the one `Store` run on SQLite:
each procedure runs on the connection the engine picks (the storage thread for writes, the event
loop for the Work stream's small batches, the reader thread for reads) with the statements of
`_statements`."""

from __future__ import annotations

import functools
import sqlite3

from agentrun_server.storage._notifier import LocalNotifier, Notifier, PollingNotifier
from agentrun_server.storage._store import P, Procedure, Store, T
from agentrun_server.storage._types import SqliteConfig
from agentrun_server.storage.sqlite._engine import Engine, run_to_end, transaction
from agentrun_server.storage.sqlite._migrate import migrate
from agentrun_server.storage.sqlite._statements import SqliteStatements

__all__ = ["SqliteStorage"]


def _in_transaction(
    db: sqlite3.Connection, procedure: Procedure[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    with transaction(db):
        return run_to_end(procedure(SqliteStatements(db), *args, **kwargs))


def _reading(
    db: sqlite3.Connection, procedure: Procedure[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    return run_to_end(procedure(SqliteStatements(db), *args, **kwargs))


class SqliteStorage(Store):
    """Storage in one SQLite file; see `Storage` for the contract of each method.

    `path` ":memory:" keeps everything in one connection (tests only).
    """

    def __init__(self, path: str, config: SqliteConfig | None = None) -> None:
        super().__init__()
        self.path = path
        self._engine = Engine(path, (config or SqliteConfig()).synchronous)

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
