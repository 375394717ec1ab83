"""PgQueuer, the peer on PostgreSQL: three chained no-op entrypoints, a -> b -> c, each job
enqueueing the next as a PgQueuer worker would, drained by one QueueManager.

    python bench/peer_pgqueuer.py postgresql://USER@HOST:PORT/DBNAME RUNS BATCH_SIZE

Needs `pip install pgqueuer` (not a dependency of agentrun). Prints jobs per second.
"""

from __future__ import annotations

import asyncio
import sys
import time


async def rate(url: str, runs: int, batch_size: int) -> float:
    """Jobs per second through a -> b -> c for `runs` first jobs, on a database with nothing
    of PgQueuer's yet (its schema is installed here)."""
    import psycopg
    from pgqueuer import PsycopgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as enqueuing,
    ):
        queries = Queries(PsycopgDriver(conn))
        await queries.install()
        manager = QueueManager(queries)
        follow = Queries(
            PsycopgDriver(enqueuing)
        )  # jobs enqueue their next on their own connection
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


if __name__ == "__main__":
    print(f"{asyncio.run(rate(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))):.0f}")
