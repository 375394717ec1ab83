"""PostgreSQL storage, for several server replicas on one database (`pip install
'agentrun[postgres]'`). `PostgresStorage` routes each call of the `Storage` protocol to its
statements (`_runs`, `_tasks`, `_leases`, `_reads`), one transaction on a pooled connection each;
migrations (`_migrate`) run at open under an advisory lock; replicas hear each other through
LISTEN/NOTIFY (`_notifier`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg

from agentrun_server._errors import Unavailable
from agentrun_server.storage._notifier import Notifier
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
    PoolConfig,
    Release,
    Revocation,
    StageBacklog,
    StoredRun,
    TaskRecord,
    TaskState,
    WorkflowDef,
)
from agentrun_server.storage.postgres import _keys, _leases, _live, _reads, _runs, _tasks
from agentrun_server.storage.postgres._engine import Connection, Engine
from agentrun_server.storage.postgres._migrate import migrate
from agentrun_server.storage.postgres._notifier import ListenNotifier

__all__ = ["PoolConfig", "PostgresStorage", "migrate"]

T = TypeVar("T")


async def _complete_and_claim(
    conn: Connection,
    workflows: _runs.WorkflowCache,
    items: Sequence[Completion],
    request: ClaimRequest,
    now: float | None,
) -> tuple[list[Ack], list[LeasedTask]]:
    acks = await _tasks.complete(conn, workflows, items, now, request.session_id)
    kept = sum(1 for ack in acks if ack.code == AckCode.INVALID_ARGUMENT)
    if kept:
        request = ClaimRequest(
            request.session_id,
            request.workflow,
            request.stage_limits,
            request.limit - kept,
            request.lease_seconds,
            request.max_bytes,
            request.server_id,
        )
    return acks, await _tasks.claim(conn, workflows, request, now)


async def _get_run(conn: Connection, run_id: str) -> StoredRun:
    return await _live.with_parts(conn, await _runs.get_run(conn, run_id))


async def _list_runs(
    conn: Connection,
    collection_id: str,
    after_seq: int,
    limit: int,
    max_bytes: int | None,
    state: str | None,
    abandoned_before: float,
) -> tuple[list[StoredRun], bool]:
    page, more = await _runs.list_runs(
        conn, collection_id, after_seq, limit, max_bytes, state, abandoned_before
    )
    return [await _live.with_parts(conn, run) for run in page], more


class PostgresStorage:
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
        self.url = url
        self._engine = Engine(url, config or PoolConfig(), caller_clock)
        self._workflows = _runs.WorkflowCache()

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

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> Awaitable[T]:
        return self._engine.run(_bound(fn, args))

    def _now(self, now: float) -> float | None:
        return self._engine.now(now)

    # --- collections and runs -------------------------------------------------------------------

    async def create_collection(
        self, name: str, description: str, workflow: str, now: float, enter_on_abandon: bool = False
    ) -> tuple[Collection, bool]:
        return await self._run(
            _runs.create_collection,
            self._workflows,
            name,
            description,
            workflow,
            self._now(now),
            enter_on_abandon,
        )

    async def get_collection(self, id: str = "", name: str = "") -> Collection:
        return await self._run(_runs.get_collection, id, name)

    async def list_collections(self) -> list[Collection]:
        return await self._run(_runs.list_collections)

    async def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> list[InsertOutcome]:
        return await self._run(
            _runs.insert_runs, self._workflows, collection_id, runs, self._now(now)
        )

    async def append_events(
        self, events: Sequence[NewEvent], fold: Fold, max_run_bytes: int, now: float
    ) -> list[EventOutcome]:
        return await self._run(
            _live.append_events, self._workflows, events, fold, max_run_bytes, self._now(now)
        )

    async def events_after(
        self, run_id: str, after_sequence: int, limit: int
    ) -> tuple[StoredRun, list[tuple[int, bytes]]]:
        return await self._run(_live.events_after, run_id, after_sequence, limit)

    async def enter_abandoned(
        self, abandoned_before: float, fold: Fold, limit: int, now: float
    ) -> list[str]:
        return await self._run(
            _live.enter_abandoned, self._workflows, abandoned_before, fold, limit, self._now(now)
        )

    async def run_collections(self, run_ids: Sequence[str]) -> dict[str, str]:
        return await self._run(_runs.run_collections, list(run_ids))

    async def count_live_runs(self, abandoned_before: float) -> tuple[int, int]:
        return await self._run(_live.count_live_runs, abandoned_before)

    async def get_run(self, run_id: str) -> StoredRun:
        return await self._run(_get_run, run_id)

    async def list_runs(
        self,
        collection_id: str,
        after_seq: int,
        limit: int,
        max_bytes: int | None = None,
        state: str | None = None,
        abandoned_before: float = 0.0,
    ) -> tuple[list[StoredRun], bool]:
        return await self._run(
            _list_runs, collection_id, after_seq, limit, max_bytes, state, abandoned_before
        )

    async def count_runs(self, collection_id: str) -> int:
        return await self._run(_runs.count_runs, collection_id)

    # --- workflows ------------------------------------------------------------------------------

    async def put_workflow(self, workflow: WorkflowDef, now: float) -> tuple[WorkflowDef, bool]:
        return await self._run(_runs.put_workflow, self._workflows, workflow, self._now(now))

    async def get_workflow(self, name: str) -> WorkflowDef:
        return await self._run(self._workflows.get, name)

    async def list_workflows(self) -> list[WorkflowDef]:
        return await self._run(_runs.list_workflows, self._workflows)

    # --- tasks: enqueue, claim, settle ----------------------------------------------------------

    async def enqueue(
        self, workflow_name: str, stage_name: str, run_ids: Sequence[str], priority: int, now: float
    ) -> tuple[int, int]:
        return await self._run(
            _tasks.enqueue,
            self._workflows,
            workflow_name,
            stage_name,
            run_ids,
            priority,
            self._now(now),
        )

    async def claim(self, request: ClaimRequest, now: float) -> list[LeasedTask]:
        return await self._run(_tasks.claim, self._workflows, request, self._now(now))

    async def complete(
        self, items: Sequence[Completion], now: float, holder: str = ""
    ) -> list[Ack]:
        return await self._run(_tasks.complete, self._workflows, items, self._now(now), holder)

    async def complete_and_claim(
        self, items: Sequence[Completion], request: ClaimRequest, now: float
    ) -> tuple[list[Ack], list[LeasedTask]]:
        return await self._run(_complete_and_claim, self._workflows, items, request, self._now(now))

    async def fail(self, items: Sequence[Failure], now: float, holder: str = "") -> list[Ack]:
        return await self._run(_tasks.fail, self._workflows, items, self._now(now), holder)

    async def extend(self, items: Sequence[Extension], now: float, holder: str = "") -> list[Ack]:
        return await self._run(_tasks.extend, self._workflows, items, self._now(now), holder)

    async def release(self, items: Sequence[Release], now: float, holder: str = "") -> list[Ack]:
        return await self._run(_tasks.release, items, self._now(now), holder)

    # --- leases: streams, servers, expiry -------------------------------------------------------

    async def release_session(self, session_id: str, now: float) -> list[EndedLease]:
        return await self._run(_leases.release_session, session_id, self._now(now))

    async def detach_session(self, session_id: str, now: float) -> int:
        return await self._run(_leases.detach_session, session_id, self._now(now))

    async def resume(
        self, session_id: str, server_id: str, items: Sequence[LeaseRef], now: float
    ) -> list[Ack]:
        return await self._run(_leases.resume, session_id, server_id, items, self._now(now))

    async def heartbeat(self, server_id: str, host: str, pid: int, now: float) -> None:
        await self._run(_leases.heartbeat, server_id, host, pid, self._now(now))

    async def remove_server(self, server_id: str) -> None:
        await self._run(_leases.remove_server, server_id)

    async def sweep(
        self, now: float, grace_seconds: float
    ) -> tuple[list[EndedLease], list[EndedLease]]:
        return await self._run(_leases.sweep, self._now(now), grace_seconds)

    async def revocations_after(self, after_id: int) -> tuple[int, list[Revocation]]:
        return await self._run(_leases.revocations_after, after_id)

    async def change_marker(self) -> int | None:
        return None  # replicas hear of changes through LISTEN/NOTIFY instead

    async def redrive(self, workflow: str, stage: str, task_ids: Sequence[int], now: float) -> int:
        return await self._run(_leases.redrive, workflow, stage, task_ids, self._now(now))

    async def cancel(
        self, workflow: str, stage: str, task_ids: Sequence[int], now: float
    ) -> tuple[int, list[EndedLease]]:
        return await self._run(_leases.cancel, workflow, stage, task_ids, self._now(now))

    # --- tasks: reads ---------------------------------------------------------------------------

    async def has_active(self, workflow: str, stages: Sequence[str]) -> bool:
        return await self._run(_reads.has_active, workflow, list(stages))

    async def backlog(self, workflow_name: str, now: float) -> list[StageBacklog]:
        return await self._run(_reads.backlog, self._workflows, workflow_name, self._now(now))

    async def get_task(self, task_id: int) -> TaskRecord:
        return await self._run(_reads.get_task, task_id)

    async def list_tasks(
        self,
        workflow: str,
        stage: str,
        state: TaskState | None,
        after_id: int,
        limit: int,
        max_bytes: int | None = None,
    ) -> tuple[list[TaskRecord], bool]:
        return await self._run(
            _reads.list_tasks, workflow, stage, state, after_id, limit, max_bytes
        )

    # --- API keys -------------------------------------------------------------------------------

    async def create_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        return await self._run(_keys.create_key, key)

    async def list_keys(self) -> list[ApiKeyRecord]:
        return await self._run(_keys.list_keys)

    async def revoke_key(self, name: str, now: float) -> ApiKeyRecord:
        return await self._run(_keys.revoke_key, name, now)

    async def keys_version(self) -> int:
        return await self._run(_keys.keys_version)

    async def touch_keys(self, used: dict[str, float]) -> None:
        await self._run(_keys.touch_keys, used)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _bound(
    fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]
) -> Callable[[Connection], Awaitable[T]]:
    """`fn(conn, *args)`, with the connection the engine picks."""

    def call(conn: Connection) -> Awaitable[T]:
        return fn(conn, *args)

    return call
