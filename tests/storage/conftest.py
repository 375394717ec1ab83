"""The storage contract suite runs against every backend: each test takes `database_url`.

SQLite files and PostgreSQL databases are made per test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agentrun_server.storage import NewRun, StageDef, Storage, WorkflowDef, open_storage

OpenStorage = Callable[[], Awaitable[Storage]]


@pytest.fixture
def database_url(database: str) -> str:
    """A fresh, empty database of each backend (the suite-wide `database` fixture)."""
    return database


@pytest.fixture
async def open_store(database_url: str) -> AsyncIterator[OpenStorage]:
    """Opens storage objects on the one database (each its own connections); closes them all.
    The tests pass their own times: PostgreSQL takes them instead of its clock."""
    opened: list[Storage] = []

    async def open_one() -> Storage:
        if database_url.startswith("sqlite"):
            opened.append(await open_storage(database_url))
        else:
            from agentrun_server.storage.postgres import PostgresStorage

            postgres = PostgresStorage(database_url, caller_clock=True)
            await postgres.open()
            opened.append(postgres)
        return opened[-1]

    yield open_one
    for storage in opened:
        await storage.close()


@pytest.fixture
async def storage(open_store: OpenStorage) -> Storage:
    """A storage object on a fresh database."""
    return await open_store()


# A two-stage workflow: a -> b (or the end); b is terminal.
GRADING = WorkflowDef(
    "w",
    (
        StageDef(
            "a",
            {"next": "b", "stop": None},
            max_attempts=2,
            initial_backoff_seconds=10,
            max_backoff_seconds=100,
            lease_seconds=30,
        ),
        StageDef("b", lease_seconds=60),
    ),
)


async def ingest(
    storage: Storage, count: int, *, prefix: str = "r", size: int = 1, now: float = 1.0
) -> str:
    """The GRADING workflow, a collection bound to it, and `count` runs in it (each a ready task
    of stage a); returns the collection id."""
    await storage.put_workflow(GRADING, now)
    collection, _ = await storage.create_collection("c", "", "w", now)
    runs = [NewRun(f"{prefix}{i}", None, bytes([i % 256]) * size) for i in range(count)]
    await storage.insert_runs(collection.id, runs, now)
    return collection.id
