"""`Store`: the `Storage` contract kept once, over any engine.

Each call runs one procedure (`storage._procedures`) in one transaction, on the path its engine
gives it: `_write` for writes, `_hot` for the Work stream's small settle and claim batches and for
uploads of a run or two (or a live run's next events), `_read` for reads. SQLite runs the three
differently (a storage thread, the event loop's own thread, a reader thread:
`storage.sqlite._engine`); PostgreSQL runs all three on its pool.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from agentrun_server.storage._procedures import (
    deletion,
    keys,
    leases,
    live,
    reads,
    tasks,
    traces,
    workflows,
)
from agentrun_server.storage._procedures import runs as _runs
from agentrun_server.storage._statements import Statements
from agentrun_server.storage._types import (
    Ack,
    ApiKeyRecord,
    Cancelled,
    ClaimRequest,
    Collection,
    CollectionPut,
    Completion,
    Deleted,
    DoomedRun,
    EndedLease,
    Enqueued,
    EventOutcome,
    EventPage,
    Extension,
    Facet,
    Failure,
    Fold,
    InsertOutcome,
    LeasedTask,
    LeasedTaskOfRun,
    LeaseHolder,
    LeaseRef,
    LiveRunCounts,
    NewEvent,
    NewRun,
    Page,
    Project,
    Rebuild,
    Release,
    RevocationPage,
    RunQuery,
    RunSelection,
    RunSize,
    SettledAndLeased,
    SpansOutcome,
    StageBacklog,
    StoredRun,
    Swept,
    TaskRecord,
    TaskState,
    TraceBatch,
    WorkflowDef,
    WorkflowPut,
)

HOT_UPLOAD_RUNS = 4
HOT_UPLOAD_BYTES = 64 * 1024
"""The uploads (and live runs' event batches, none finishing) run on the hot path: at most this
many runs (events) and bytes, a claim's worth of work."""

P = ParamSpec("P")
T = TypeVar("T")
Procedure = Callable[Concatenate[Statements, P], Coroutine[Any, Any, T]]
"""A coroutine over one transaction's statements."""


class Store:
    """Storage on one database; see `Storage` for the contract of each method. An engine
    subclasses it with the three ways it runs a procedure, and `open`, `close`, `notifier`."""

    def __init__(self) -> None:
        self._workflows = workflows.WorkflowCache()

    async def _write(self, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `procedure` in a write transaction."""
        raise NotImplementedError

    async def _hot(
        self, tasks: int, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `procedure`, touching about `tasks` tasks, in a write transaction on the Work
        stream's hot path."""
        raise NotImplementedError

    async def _read(self, procedure: Procedure[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `procedure`, which only reads."""
        raise NotImplementedError

    # --- collections and runs -------------------------------------------------------------------

    async def create_collection(
        self,
        name: str,
        description: str,
        workflow: str,
        now: float,
        enter_on_abandon: bool = False,
        retention_days: int = 0,
    ) -> CollectionPut:
        return await self._write(
            _runs.create_collection,
            self._workflows,
            name,
            description,
            workflow,
            now,
            enter_on_abandon,
            retention_days,
        )

    async def get_collection(self, id: str = "", name: str = "") -> Collection:
        return await self._read(_runs.get_collection, id, name)

    async def list_collections(self) -> list[Collection]:
        return await self._read(_runs.list_collections)

    async def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> list[InsertOutcome]:
        if len(runs) <= HOT_UPLOAD_RUNS and sum(len(r.data) for r in runs) <= HOT_UPLOAD_BYTES:
            # A run or two, as an agent sends each as it ends: the hot path, as cheap as a claim,
            # and the run's task is ready without two thread hops.
            return await self._hot(
                len(runs), _runs.insert_runs, self._workflows, collection_id, runs, now
            )
        return await self._write(_runs.insert_runs, self._workflows, collection_id, runs, now)

    async def append_events(
        self, events: Sequence[NewEvent], fold: Fold, max_run_bytes: int, now: float
    ) -> list[EventOutcome]:
        if (
            len(events) <= HOT_UPLOAD_RUNS
            and not any(event.finish for event in events)  # a finish folds the whole run
            and sum(len(event.patch) for event in events) <= HOT_UPLOAD_BYTES
        ):
            # A live run's next message or two: the hot path, as a small upload takes.
            return await self._hot(
                len(events), live.append_events, self._workflows, events, fold, max_run_bytes, now
            )
        return await self._write(
            live.append_events, self._workflows, events, fold, max_run_bytes, now
        )

    async def events_after(
        self, run_id: str, after_sequence: int, limit: int, max_bytes: int | None = None
    ) -> EventPage:
        return await self._read(live.events_after, run_id, after_sequence, limit, max_bytes)

    async def enter_abandoned(
        self, abandoned_before: float, fold: Fold, limit: int, now: float
    ) -> list[str]:
        return await self._write(
            live.enter_abandoned, self._workflows, abandoned_before, fold, limit, now
        )

    async def run_collections(self, run_ids: Sequence[str]) -> dict[str, str]:
        return await self._read(_runs.run_collections, run_ids)

    async def count_live_runs(self, abandoned_before: float) -> dict[str, LiveRunCounts]:
        return await self._read(live.count_live_runs, abandoned_before)

    async def get_run(self, run_id: str) -> StoredRun:
        return await self._read(_runs.get_run, run_id)

    async def run_size(self, run_id: str) -> RunSize:
        return await self._read(_runs.run_size, run_id)

    async def list_runs(
        self, query: RunQuery, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> Page[StoredRun]:
        return await self._read(_runs.list_runs, query, after_seq, limit, max_bytes)

    async def backfill_facets(
        self, facets_of: Callable[[bytes], Sequence[Facet]], limit: int
    ) -> int:
        return await self._write(_runs.backfill_facets, facets_of, limit)

    async def count_runs(self, collection_id: str) -> int:
        return await self._read(_runs.count_runs, collection_id)

    # --- OpenTelemetry traces -------------------------------------------------------------------

    async def append_spans(
        self,
        batches: Sequence[TraceBatch],
        project: Project,
        fold: Fold,
        max_run_bytes: int,
        now: float,
    ) -> list[SpansOutcome]:
        return await self._write(
            traces.append_spans, self._workflows, batches, project, fold, max_run_bytes, now
        )

    async def finish_quiet_traces(
        self, quiet_before: float, rebuild: Rebuild, max_run_bytes: int, limit: int, now: float
    ) -> list[str]:
        return await self._write(
            traces.finish_quiet_traces,
            self._workflows,
            quiet_before,
            rebuild,
            max_run_bytes,
            limit,
            now,
        )

    # --- deletion -------------------------------------------------------------------------------

    async def update_collection(
        self, collection_id: str, description: str | None = None, retention_days: int | None = None
    ) -> Collection:
        return await self._write(
            deletion.update_collection, collection_id, description, retention_days
        )

    async def leased_tasks(self, selection: RunSelection) -> list[LeasedTaskOfRun]:
        return await self._read(deletion.leased_tasks, selection)

    async def delete_runs(
        self, selection: RunSelection, force: bool, limit: int, now: float
    ) -> Deleted:
        return await self._write(deletion.delete_runs, selection, force, limit, now)

    async def delete_collection(
        self, collection_id: str, force: bool, limit: int, now: float
    ) -> Deleted:
        return await self._write(deletion.delete_collection, collection_id, force, limit, now)

    async def delete_expired(self, now: float, limit: int) -> list[DoomedRun]:
        return await self._write(deletion.delete_expired, now, limit)

    async def reclaim_space(self, max_bytes: int) -> int:
        """See `Storage.reclaim_space`: nothing here; SQLite's engine gives pages back."""
        return 0

    # --- workflows ------------------------------------------------------------------------------

    async def put_workflow(
        self, workflow: WorkflowDef, now: float, force: bool = False
    ) -> WorkflowPut:
        return await self._write(workflows.put_workflow, self._workflows, workflow, now, force)

    async def get_workflow(self, name: str) -> WorkflowDef:
        return await self._read(self._workflows.get, name)

    async def list_workflows(self) -> list[WorkflowDef]:
        return await self._read(workflows.list_workflows, self._workflows)

    # --- tasks: enqueue, claim, settle ----------------------------------------------------------

    async def enqueue(
        self, workflow_name: str, stage_name: str, run_ids: Sequence[str], priority: int, now: float
    ) -> Enqueued:
        return await self._write(
            tasks.enqueue, self._workflows, workflow_name, stage_name, run_ids, priority, now
        )

    async def claim(self, request: ClaimRequest, now: float) -> list[LeasedTask]:
        return await self._hot(request.limit, tasks.claim, self._workflows, request, now)

    async def complete(
        self, items: Sequence[Completion], now: float, holder: str = ""
    ) -> list[Ack]:
        return await self._hot(len(items), tasks.complete, self._workflows, items, now, holder)

    async def complete_and_claim(
        self, items: Sequence[Completion], request: ClaimRequest, now: float
    ) -> SettledAndLeased:
        return await self._hot(
            len(items) + request.limit,
            tasks.complete_and_claim,
            self._workflows,
            items,
            request,
            now,
        )

    async def fail(self, items: Sequence[Failure], now: float, holder: str = "") -> list[Ack]:
        return await self._hot(len(items), tasks.fail, self._workflows, items, now, holder)

    async def extend(self, items: Sequence[Extension], now: float, holder: str = "") -> list[Ack]:
        return await self._hot(len(items), tasks.extend, self._workflows, items, now, holder)

    async def release(self, items: Sequence[Release], now: float, holder: str = "") -> list[Ack]:
        return await self._hot(len(items), tasks.release, items, now, holder)

    # --- leases: streams, servers, expiry -------------------------------------------------------

    async def end_session_leases(self, session_id: str, now: float) -> list[EndedLease]:
        return await self._write(leases.end_session_leases, session_id, now)

    async def detach_session(self, session_id: str, now: float) -> int:
        return await self._write(leases.detach_session, session_id, now)

    async def resume(
        self, holder: LeaseHolder, server_id: str, items: Sequence[LeaseRef], now: float
    ) -> list[Ack]:
        return await self._write(leases.resume, holder, server_id, items, now)

    async def heartbeat(self, server_id: str, host: str, pid: int, now: float) -> None:
        await self._write(leases.heartbeat, server_id, host, pid, now)

    async def remove_server(self, server_id: str) -> None:
        await self._write(leases.remove_server, server_id)

    async def sweep(self, now: float, grace_seconds: float) -> Swept:
        return await self._write(leases.sweep, now, grace_seconds)

    async def revocations_after(self, after_id: int) -> RevocationPage:
        return await self._read(leases.revocations_after, after_id)

    async def redrive(self, workflow: str, stage: str, task_ids: Sequence[int], now: float) -> int:
        return await self._write(leases.redrive, self._workflows, workflow, stage, task_ids, now)

    async def cancel(
        self, workflow: str, stage: str, task_ids: Sequence[int], now: float
    ) -> Cancelled:
        return await self._write(leases.cancel, self._workflows, workflow, stage, task_ids, now)

    # --- tasks: reads ---------------------------------------------------------------------------

    async def has_active(self, workflow: str, stages: Sequence[str]) -> bool:
        return await self._read(reads.has_active, workflow, stages)

    async def backlog(self, workflow_name: str, now: float) -> list[StageBacklog]:
        return await self._read(reads.backlog, self._workflows, workflow_name, now)

    async def get_task(self, task_id: int) -> TaskRecord:
        return await self._read(reads.get_task, task_id)

    async def list_tasks(
        self,
        workflow: str,
        stage: str,
        state: TaskState | None,
        after_id: int,
        limit: int,
        max_bytes: int | None = None,
        agent_run_id: str = "",
    ) -> Page[TaskRecord]:
        return await self._read(
            reads.list_tasks, workflow, stage, state, after_id, limit, max_bytes, agent_run_id
        )

    # --- API keys -------------------------------------------------------------------------------

    async def create_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        return await self._write(keys.create_key, key)

    async def list_keys(self) -> list[ApiKeyRecord]:
        return await self._read(keys.list_keys)

    async def revoke_key(self, name: str, now: float) -> ApiKeyRecord:
        return await self._write(keys.revoke_key, name, now)

    async def keys_version(self) -> int:
        return await self._read(keys.keys_version)

    async def touch_keys(self, used: dict[str, float]) -> None:
        await self._write(keys.touch_keys, used)
