"""The storage contract suite runs against every backend: each test takes `database_url`.

SQLite files are made per test. (The PostgreSQL backend adds its parameter here.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agentrun_server.storage import NewRun, StageDef, Storage, WorkflowDef, open_storage

BACKENDS = ["sqlite"]

OpenStorage = Callable[[], Awaitable[Storage]]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    assert request.param == "sqlite"
    return f"sqlite:///{tmp_path / 'agentrun.db'}"


@pytest.fixture
async def open_store(database_url: str) -> AsyncIterator[OpenStorage]:
    """Opens storage objects on the one database (each its own connections); closes them all."""
    opened: list[Storage] = []

    async def open_one() -> Storage:
        opened.append(await open_storage(database_url))
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
