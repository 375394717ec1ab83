"""Storage shared by the ingestion and orchestrator services, behind one narrow interface.

`open_storage("sqlite:///path.db")` returns an opened store. Signatures carry only the records of
`storage._types` and opaque bytes (encoded protobuf messages), never generated types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agentrun_server._errors import InvalidArgument
from agentrun_server.storage._sqlite import SqliteStorage, backoff_seconds
from agentrun_server.storage._types import (
    Ack,
    AckCode,
    AttemptFailureRecord,
    ClaimRequest,
    Collection,
    Completion,
    EndedLease,
    Extension,
    Failure,
    InsertOutcome,
    InsertStatus,
    LeasedTask,
    NewRun,
    Release,
    StageBacklog,
    StageDef,
    StoredRun,
    TaskRecord,
    TaskState,
    WorkflowDef,
    check_name,
)

__all__ = [
    "Ack",
    "AckCode",
    "AttemptFailureRecord",
    "ClaimRequest",
    "Collection",
    "Completion",
    "EndedLease",
    "Extension",
    "Failure",
    "InsertOutcome",
    "InsertStatus",
    "LeasedTask",
    "NewRun",
    "Release",
    "SqliteStorage",
    "StageBacklog",
    "StageDef",
    "Storage",
    "StoredRun",
    "TaskRecord",
    "TaskState",
    "WorkflowDef",
    "backoff_seconds",
    "check_name",
    "open_storage",
]


class Storage(Protocol):
    """What the services need from storage. Every method is a coroutine; times are epoch seconds."""

    async def close(self) -> None: ...
    async def create_collection(
        self, name: str, description: str, workflow: str, now: float
    ) -> tuple[Collection, bool]: ...
    async def get_collection(self, id: str = "", name: str = "") -> Collection: ...
    async def list_collections(self) -> list[Collection]: ...
    async def insert_runs(
        self, collection_id: str, runs: list[NewRun], now: float
    ) -> list[InsertOutcome]: ...
    async def get_run(self, run_id: str) -> StoredRun: ...
    async def list_runs(
        self, collection_id: str, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> tuple[list[StoredRun], bool]: ...
    async def count_runs(self, collection_id: str) -> int: ...
    async def put_workflow(self, workflow: WorkflowDef, now: float) -> tuple[WorkflowDef, bool]: ...
    async def get_workflow(self, name: str) -> WorkflowDef: ...
    async def list_workflows(self) -> list[WorkflowDef]: ...
    async def enqueue(
        self, workflow_name: str, stage_name: str, run_ids: list[str], priority: int, now: float
    ) -> tuple[int, int]: ...
    async def claim(self, request: ClaimRequest, now: float) -> list[LeasedTask]: ...
    async def complete(self, items: list[Completion], now: float) -> list[Ack]: ...
    async def complete_and_claim(
        self, items: list[Completion], request: ClaimRequest, now: float
    ) -> tuple[list[Ack], list[LeasedTask]]: ...
    async def fail(self, items: list[Failure], now: float) -> list[Ack]: ...
    async def extend(self, items: list[Extension], now: float) -> list[Ack]: ...
    async def release(self, items: list[Release], now: float) -> list[Ack]: ...
    async def release_session(self, session_id: str, now: float) -> list[EndedLease]: ...
    async def expire_leases(self, now: float) -> list[EndedLease]: ...
    async def active_count(self, workflow: str, stages: list[str]) -> int: ...
    async def backlog(self, workflow_name: str, now: float) -> list[StageBacklog]: ...
    async def get_task(self, task_id: int) -> TaskRecord: ...
    async def list_tasks(
        self,
        workflow: str,
        stage: str,
        state: TaskState | None,
        after_id: int,
        limit: int,
        max_bytes: int | None = None,
    ) -> tuple[list[TaskRecord], bool]: ...
    async def redrive(self, workflow: str, stage: str, task_ids: list[int], now: float) -> int: ...
    async def cancel(
        self, workflow: str, stage: str, task_ids: list[int], now: float
    ) -> tuple[int, list[EndedLease]]: ...


async def open_storage(url: str) -> Storage:
    """Open the store a URL names: `sqlite:///relative.db`, `sqlite:////abs/path.db`, or a path.

    Raises:
        InvalidArgument: an unsupported scheme (PostgreSQL support is a later addition).
    """
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://").removeprefix("/") or ":memory:"
    elif "://" in url:
        scheme = url.split("://", 1)[0]
        raise InvalidArgument(f"--db: unsupported database scheme {scheme!r}; use sqlite:///PATH")
    else:
        path = url
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage = SqliteStorage(path)
    await storage.open()
    return storage
