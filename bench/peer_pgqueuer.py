"""PgQueuer, the peer on PostgreSQL: three chained no-op entrypoints, a -> b -> c, each job
enqueueing the next as a PgQueuer worker would, drained by one QueueManager.

    python bench/peer_pgqueuer.py postgresql://USER@HOST:PORT/DBNAME RUNS BATCH_SIZE [DRIVER]

DRIVER: psycopg (default) or asyncpg, PgQueuer's faster one. Needs `make install-bench`
(pgqueuer and asyncpg are not dependencies of agentrun). Prints jobs per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any


async def rate(url: str, runs: int, batch_size: int, driver: str = "psycopg") -> float:
    """Jobs per second through a -> b -> c for `runs` first jobs, on a database with nothing
    of PgQueuer's yet (its schema is installed here)."""
    from pgqueuer import Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    async with contextlib.AsyncExitStack() as stack:
        conn, enqueuing = [await stack.enter_async_context(_connect(url, driver)) for _ in "ab"]
        queries = Queries(conn)
        await queries.install()
        manager = QueueManager(queries)
        follow = Queries(enqueuing)  # jobs enqueue their next on their own connection
        done = [0]

        @manager.entrypoint("a")
        async def a(job: object) -> None:
            await follow.enqueue("b", None)
            done[0] += 1

        @manager.entrypoint("b")
        async def b(job: object) -> None:
            await follow.enqueue("c", None)
            done[0] += 1

        @manager.entrypoint("c")
        async def c(job: object) -> None:
            done[0] += 1

        await queries.enqueue(["a"] * runs, [None] * runs, [0] * runs)
        started = time.perf_counter()
        await manager.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
        elapsed = time.perf_counter() - started
    assert done[0] == 3 * runs, f"PgQueuer ran {done[0]} of {3 * runs} jobs"
    return done[0] / elapsed


@contextlib.asynccontextmanager
async def _connect(url: str, driver: str) -> AsyncIterator[Any]:
    """A PgQueuer driver on a new connection."""
    if driver == "asyncpg":
        import asyncpg
        from pgqueuer import AsyncpgDriver

        connection = await asyncpg.connect(url)
        try:
            yield AsyncpgDriver(connection)
        finally:
            await connection.close()
        return
    import psycopg
    from pgqueuer import PsycopgDriver

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
        yield PsycopgDriver(connection)


if __name__ == "__main__":
    driver = sys.argv[4] if len(sys.argv) > 4 else "psycopg"
    print(f"{asyncio.run(rate(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), driver)):.0f}")
