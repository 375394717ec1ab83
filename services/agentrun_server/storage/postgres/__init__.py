"""PostgreSQL storage, for several server replicas on one database (`pip install
'agentrun-grpc[postgres]'`). `PostgresStorage` is the one `Store` run on PostgreSQL: each procedure in
one transaction on a pooled connection (`_engine`), with the statements of `_statements`;
migrations (`_migrate`) run at open under an advisory lock; replicas hear each other through
LISTEN/NOTIFY (`_notifier`)."""

from __future__ import annotations

import psycopg

from agentrun_server._errors import Unavailable
from agentrun_server.storage._notifier import Notifier
from agentrun_server.storage._store import P, Procedure, Store, T
from agentrun_server.storage._types import PoolConfig
from agentrun_server.storage.postgres._engine import Engine
from agentrun_server.storage.postgres._migrate import migrate
from agentrun_server.storage.postgres._notifier import ListenNotifier
from agentrun_server.storage.postgres._statements import PostgresStatements

__all__ = ["PoolConfig", "PostgresStorage", "migrate"]


class PostgresStorage(Store):
    """Storage in one PostgreSQL database; see `Storage` for the contract of each method.

    Args:
        url: `postgresql://USER@HOST:PORT/DBNAME` (or `postgres://`).
        config: Pool size and statement timeout.
        caller_clock: Take times from the callers' `now` arguments rather than the database's
            clock (tests only: replicas must share one clock, the database's).
    """

    def __init__(
        self, url: str, config: PoolConfig | None = None, *, caller_clock: bool = False
    ) -> None:
        super().__init__()
        self.url = url
        self._engine = Engine(url, config or PoolConfig(), caller_clock)

    async def open(self, schema_version: int | None = None) -> None:
        """Apply pending migrations (up to `schema_version`; None: all), then open the pool.

        Raises:
            Unavailable: the database cannot be reached.
        """
        try:
            await migrate(self.url, schema_version)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"storage: cannot connect to PostgreSQL: {_first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise Unavailable(f"storage: a migration failed: {_first_line(exc)}") from exc
        await self._engine.open()

    async def close(self) -> None:
        await self._engine.close()

    def notifier(self) -> Notifier:
        """LISTEN/NOTIFY between replicas, polling as the fallback."""
        return ListenNotifier(self.url, self)

    async def _write(self, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        clock = self._engine.caller_clock
        return await self._engine.run(
            lambda conn: procedure(PostgresStatements(conn, clock), *args, **kwargs)
        )

    async def _hot(
        self, tasks: int, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self._write(procedure, *args, **kwargs)

    async def _read(self, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._write(procedure, *args, **kwargs)

    async def change_marker(self) -> int | None:
        return None  # replicas hear of changes through LISTEN/NOTIFY instead


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
