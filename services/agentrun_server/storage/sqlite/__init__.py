"""SQLite storage (WAL): the embedded default. `SqliteStorage` routes each call of the `Storage`
protocol to its statements (`_runs`, `_workflows`, `_claims`, `_settles`, `_leases`, `_counts`,
`_task_reads`) on the connection the engine picks: the storage thread for writes, the event loop
for the Work stream's small batches (the hot path), the reader thread for reads."""

from __future__ import annotations

import dataclasses
import functools
import sqlite3
from collections.abc import Sequence

from agentrun_server.storage._notifier import LocalNotifier, Notifier, PollingNotifier
from agentrun_server.storage._types import (
    Ack,
    AckCode,
    ApiKeyRecord,
    ClaimRequest,
    Collection,
    Completion,
    EndedLease,
    EventOutcome,
    Extension,
    Failure,
    Fold,
    InsertOutcome,
    LeasedTask,
    LeaseRef,
    NewEvent,
    NewRun,
    Release,
    Revocation,
    SqliteConfig,
    StageBacklog,
    StoredRun,
    TaskRecord,
    TaskState,
    WorkflowDef,
)
from agentrun_server.storage.sqlite import (
    _claims,
    _counts,
    _keys,
    _leases,
    _live,
    _runs,
    _settles,
    _task_reads,
    _workflows,
)
from agentrun_server.storage.sqlite._engine import Engine, transaction
from agentrun_server.storage.sqlite._migrate import migrate

__all__ = ["SqliteStorage"]


def _complete(
    db: sqlite3.Connection,
    workflows: _workflows.WorkflowCache,
    items: Sequence[Completion],
    now: float,
    holder: str,
) -> list[Ack]:
    with transaction(db):
        return _settles.complete(db, workflows, items, now, holder)


def _complete_and_claim(
    db: sqlite3.Connection,
    workflows: _workflows.WorkflowCache,
    items: Sequence[Completion],
    request: ClaimRequest,
    now: float,
) -> tuple[list[Ack], list[LeasedTask]]:
    with transaction(db):
        acks = _settles.complete(db, workflows, items, now, request.session_id)
        kept = sum(1 for ack in acks if ack.code == AckCode.INVALID_ARGUMENT)
        if kept:
            request = dataclasses.replace(request, limit=request.limit - kept)
        return acks, _claims.claim(db, workflows, request, now)


def _claim(
    db: sqlite3.Connection, workflows: _workflows.WorkflowCache, request: ClaimRequest, now: float
) -> list[LeasedTask]:
    with transaction(db):
        return _claims.claim(db, workflows, request, now)


def _fail(
    db: sqlite3.Connection,
    workflows: _workflows.WorkflowCache,
    items: Sequence[Failure],
    now: float,
    holder: str,
) -> list[Ack]:
    with transaction(db):
        return _settles.fail(db, workflows, items, now, holder)


def _extend(
    db: sqlite3.Connection,
    workflows: _workflows.WorkflowCache,
    items: Sequence[Extension],
    now: float,
    holder: str,
) -> list[Ack]:
    with transaction(db):
        return _settles.extend(db, workflows, items, now, holder)


def _release(
    db: sqlite3.Connection, items: Sequence[Release], now: float, holder: str
) -> list[Ack]:
    with transaction(db):
        return _settles.release(db, items, now, holder)


def _change_marker(db: sqlite3.Connection) -> int:
    # Changes whenever another connection (of this process or another) commits.
    return int(db.execute("PRAGMA data_version").fetchone()[0])


class SqliteStorage:
    """Storage in one SQLite file; see `Storage` for the contract of each method.

    `path` ":memory:" keeps everything in one connection (tests only).
    """

    def __init__(self, path: str, config: SqliteConfig | None = None) -> None:
        self.path = path
        self._engine = Engine(path, (config or SqliteConfig()).synchronous)
        self._workflows = _workflows.WorkflowCache()

    async def open(self, schema_version: int | None = None) -> None:
        """Open the file (creating it) and apply pending migrations (up to `schema_version`;
        None: all of them, as the server does)."""
        await self._engine.open(functools.partial(migrate, target=schema_version))

    async def close(self) -> None:
        await self._engine.close()

    def notifier(self) -> Notifier:
        """The data version and the revocations table, polled (one process in memory: local)."""
        return LocalNotifier() if self._engine.in_memory else PollingNotifier(self)

    # --- collections and runs -------------------------------------------------------------------

    async def create_collection(
        self, name: str, description: str, workflow: str, now: float, enter_on_abandon: bool = False
    ) -> tuple[Collection, bool]:
        return await self._engine.write(
            _runs.create_collection,
            self._workflows,
            name,
            description,
            workflow,
            now,
            enter_on_abandon,
        )

    async def get_collection(self, id: str = "", name: str = "") -> Collection:
        return await self._engine.read(_runs.get_collection, id, name)

    async def list_collections(self) -> list[Collection]:
        return await self._engine.read(_runs.list_collections)

    async def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> list[InsertOutcome]:
        return await self._engine.write(
            _runs.insert_runs, self._workflows, collection_id, runs, now
        )

    async def append_events(
        self, events: Sequence[NewEvent], fold: Fold, max_run_bytes: int, now: float
    ) -> list[EventOutcome]:
        return await self._engine.write(
            _live.append_events, self._workflows, events, fold, max_run_bytes, now
        )

    async def events_after(
        self, run_id: str, after_sequence: int, limit: int
    ) -> tuple[StoredRun, list[tuple[int, bytes]]]:
        return await self._engine.read(_live.events_after, run_id, after_sequence, limit)

    async def enter_abandoned(
        self, abandoned_before: float, fold: Fold, limit: int, now: float
    ) -> list[str]:
        return await self._engine.write(
            _live.enter_abandoned, self._workflows, abandoned_before, fold, limit, now
        )

    async def run_collections(self, run_ids: Sequence[str]) -> dict[str, str]:
        return await self._engine.read(_runs.run_collections, run_ids)

    async def count_live_runs(self, abandoned_before: float) -> tuple[int, int]:
        return await self._engine.read(_live.count_live_runs, abandoned_before)

    async def get_run(self, run_id: str) -> StoredRun:
        return await self._engine.read(_runs.get_run, run_id)

    async def list_runs(
        self,
        collection_id: str,
        after_seq: int,
        limit: int,
        max_bytes: int | None = None,
        state: str | None = None,
        abandoned_before: float = 0.0,
    ) -> tuple[list[StoredRun], bool]:
        return await self._engine.read(
            _runs.list_runs, collection_id, after_seq, limit, max_bytes, state, abandoned_before
        )

    async def count_runs(self, collection_id: str) -> int:
        return await self._engine.read(_runs.count_runs, collection_id)

    # --- workflows ------------------------------------------------------------------------------

    async def put_workflow(self, workflow: WorkflowDef, now: float) -> tuple[WorkflowDef, bool]:
        return await self._engine.write(_workflows.put_workflow, self._workflows, workflow, now)

    async def get_workflow(self, name: str) -> WorkflowDef:
        return await self._engine.read(_workflows.get_workflow, self._workflows, name)

    async def list_workflows(self) -> list[WorkflowDef]:
        return await self._engine.read(_workflows.list_workflows, self._workflows)

    # --- tasks: enqueue, claim, settle ----------------------------------------------------------

    async def enqueue(
        self, workflow_name: str, stage_name: str, run_ids: Sequence[str], priority: int, now: float
    ) -> tuple[int, int]:
        return await self._engine.write(
            _claims.enqueue, self._workflows, workflow_name, stage_name, run_ids, priority, now
        )

    async def claim(self, request: ClaimRequest, now: float) -> list[LeasedTask]:
        return await self._engine.hot(request.limit, _claim, self._workflows, request, now)

    async def complete(
        self, items: Sequence[Completion], now: float, holder: str = ""
    ) -> list[Ack]:
        return await self._engine.hot(len(items), _complete, self._workflows, items, now, holder)

    async def complete_and_claim(
        self, items: Sequence[Completion], request: ClaimRequest, now: float
    ) -> tuple[list[Ack], list[LeasedTask]]:
        return await self._engine.hot(
            len(items) + request.limit, _complete_and_claim, self._workflows, items, request, now
        )

    async def fail(self, items: Sequence[Failure], now: float, holder: str = "") -> list[Ack]:
        return await self._engine.hot(len(items), _fail, self._workflows, items, now, holder)

    async def extend(self, items: Sequence[Extension], now: float, holder: str = "") -> list[Ack]:
        return await self._engine.hot(len(items), _extend, self._workflows, items, now, holder)

    async def release(self, items: Sequence[Release], now: float, holder: str = "") -> list[Ack]:
        return await self._engine.hot(len(items), _release, items, now, holder)

    # --- leases: streams, servers, expiry -------------------------------------------------------

    async def release_session(self, session_id: str, now: float) -> list[EndedLease]:
        return await self._engine.write(_leases.release_session, session_id, now)

    async def detach_session(self, session_id: str, now: float) -> int:
        return await self._engine.write(_leases.detach_session, session_id, now)

    async def resume(
        self, session_id: str, server_id: str, items: Sequence[LeaseRef], now: float
    ) -> list[Ack]:
        return await self._engine.write(_leases.resume, session_id, server_id, items, now)

    async def heartbeat(self, server_id: str, host: str, pid: int, now: float) -> None:
        await self._engine.write(_leases.heartbeat, server_id, host, pid, now)

    async def remove_server(self, server_id: str) -> None:
        await self._engine.write(_leases.remove_server, server_id)

    async def sweep(
        self, now: float, grace_seconds: float
    ) -> tuple[list[EndedLease], list[EndedLease]]:
        return await self._engine.write(_leases.sweep, now, grace_seconds)

    async def revocations_after(self, after_id: int) -> tuple[int, list[Revocation]]:
        return await self._engine.read(_leases.revocations_after, after_id)

    async def events_landed_after(self, after_id: int) -> tuple[int, list[str] | None]:
        """The newest event's row id, and the runs with events after `after_id` (for the
        `PollingNotifier`; None: too many to name)."""
        return await self._engine.read(_live.events_landed_after, after_id)

    async def change_marker(self) -> int | None:
        if self._engine.in_memory:
            return None
        return await self._engine.read(_change_marker)

    async def redrive(self, workflow: str, stage: str, task_ids: Sequence[int], now: float) -> int:
        return await self._engine.write(_leases.redrive, workflow, stage, task_ids, now)

    async def cancel(
        self, workflow: str, stage: str, task_ids: Sequence[int], now: float
    ) -> tuple[int, list[EndedLease]]:
        return await self._engine.write(_leases.cancel, workflow, stage, task_ids, now)

    # --- tasks: reads ---------------------------------------------------------------------------

    async def has_active(self, workflow: str, stages: Sequence[str]) -> bool:
        return await self._engine.read(_counts.has_active, workflow, list(stages))

    async def backlog(self, workflow_name: str, now: float) -> list[StageBacklog]:
        return await self._engine.read(_counts.backlog, self._workflows, workflow_name, now)

    async def get_task(self, task_id: int) -> TaskRecord:
        return await self._engine.read(_task_reads.get_task, task_id)

    async def list_tasks(
        self,
        workflow: str,
        stage: str,
        state: TaskState | None,
        after_id: int,
        limit: int,
        max_bytes: int | None = None,
    ) -> tuple[list[TaskRecord], bool]:
        return await self._engine.read(
            _task_reads.list_tasks, workflow, stage, state, after_id, limit, max_bytes
        )

    # --- API keys -------------------------------------------------------------------------------

    async def create_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        return await self._engine.write(_keys.create_key, key)

    async def list_keys(self) -> list[ApiKeyRecord]:
        return await self._engine.read(_keys.list_keys)

    async def revoke_key(self, name: str, now: float) -> ApiKeyRecord:
        return await self._engine.write(_keys.revoke_key, name, now)

    async def keys_version(self) -> int:
        return await self._engine.read(_keys.keys_version)

    async def touch_keys(self, used: dict[str, float]) -> None:
        await self._engine.write(_keys.touch_keys, used)
