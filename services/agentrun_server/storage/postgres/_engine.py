"""How a storage call reaches PostgreSQL: a pool of asynchronous connections (psycopg 3), one
transaction per call, retried when the database aborts it for a deadlock or a serialization
failure, and driver errors mapped once to the server's own.

Times come from the database's clock: statements read `NOW` (the transaction's `now()`, in epoch
seconds) unless the store was opened with the caller's clock (tests, which pass their own times).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from agentrun_server._errors import InvalidArgument, Unavailable
from agentrun_server.storage._types import PoolConfig

_log = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.AsyncConnection[Any]

NOW = "coalesce(%(now)s::float8, extract(epoch from now()))"
"""The current time in epoch seconds: the caller's (`now` parameter) or the database's."""
RETRIES = 3
"""Transactions aborted by a deadlock or a serialization failure run again this many times."""
# A unique violation only races a redrive with a run enqueued meanwhile, a foreign key violation a
# write with a deletion of what it refers to (a run stored into a collection being deleted): run
# again, each sees what the other did.
_RETRIED = (
    errors.DeadlockDetected,
    errors.SerializationFailure,
    errors.UniqueViolation,
    errors.ForeignKeyViolation,
)


class Engine:
    """A pool of connections to one database.

    Args:
        url: A libpq connection URL, `postgresql://USER@HOST:PORT/DBNAME`.
        config: Pool size and statement timeout.
        caller_clock: Use the times callers pass instead of the database's (tests only).
    """

    def __init__(self, url: str, config: PoolConfig, caller_clock: bool = False) -> None:
        self.url = url
        self.config = config
        self.caller_clock = caller_clock
        timeout_ms = int(config.statement_timeout_seconds * 1000)
        self.pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=config.max_connections,
            open=False,
            kwargs={"options": f"-c statement_timeout={timeout_ms}"},
            name="agentrun",
        )

    async def open(self) -> None:
        """Open the pool (its first connection must succeed).

        Raises:
            Unavailable: the database cannot be reached.
        """
        try:
            await self.pool.open(wait=True, timeout=10)
        except Exception as exc:
            await self.pool.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Unavailable(f"storage: cannot connect to PostgreSQL: {first}") from exc

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `fn(conn)` in one transaction on a pooled connection; commit on return.

        Raises:
            Unavailable: the database is unreachable or out of resources (disk full), a
                statement timed out, or the transaction kept being aborted (deadlocks,
                serialization failures).
            InvalidArgument: the database refused a value (a DataError).
        """
        for attempt in range(1, RETRIES + 2):
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    return await fn(conn)
            except _RETRIED as exc:
                if attempt > RETRIES:
                    raise Unavailable(
                        f"storage: {exc.sqlstate}: transaction aborted {attempt} times"
                    ) from exc
                _log.debug("transaction aborted (%s); running it again", exc.sqlstate)
            except errors.QueryCanceled as exc:
                raise Unavailable(
                    f"storage: a statement ran over {self.config.statement_timeout_seconds:g} s"
                ) from exc
            except (psycopg.OperationalError, PoolTimeout) as exc:
                # Connection loss, the server shutting down, a full disk (class 53): all pass.
                raise Unavailable(f"storage: PostgreSQL unavailable: {exc}") from exc
            except errors.DataError as exc:
                # A value the checks at the edge let through and the database refuses.
                _log.warning("storage refused a value: %s", exc)
                first = str(exc).strip().splitlines()[0][:200]
                raise InvalidArgument(f"a value the database cannot store: {first}") from exc
        raise AssertionError("unreachable")
