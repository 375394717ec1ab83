"""Storage shared by the ingestion and orchestrator services, behind one narrow interface.

`open_storage("sqlite:///path.db")` returns an opened store. Signatures carry only the records of
`storage._types` and opaque bytes (encoded protobuf messages), never generated types.

Written once for every engine: what a claim takes and what a settle means (`storage._rules`,
pure decisions), and each procedure around them (`storage._procedures`, coroutines over one
transaction's statements), run by `storage._store.Store`. An engine (`storage.sqlite`,
`storage.postgres`) brings its statements (`storage._statements.Statements`, each state change a
guarded one), its transactions and its connections. `tests/storage` holds the contract suite every
engine passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from agentrun_server._errors import InvalidArgument
from agentrun_server.storage._notifier import LocalNotifier, Notifier, PollingNotifier
from agentrun_server.storage._rules import (
    backoff_seconds,
    event_digest,
    leased_message,
    run_state,
)
from agentrun_server.storage._types import (
    Ack,
    AckCode,
    AckResult,
    ApiKeyRecord,
    AttemptFailureRecord,
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
    EventStatus,
    Extension,
    Facet,
    Failure,
    Fold,
    Folded,
    InsertOutcome,
    InsertStatus,
    LeasedTask,
    LeasedTaskOfRun,
    LeaseHolder,
    LeaseRef,
    LiveRunCounts,
    NewEvent,
    NewRun,
    NewSpan,
    Page,
    PoolConfig,
    Project,
    Rebuild,
    Release,
    Revocation,
    RevocationPage,
    RunFilter,
    RunQuery,
    RunSelection,
    RunSize,
    SettledAndLeased,
    SpansOutcome,
    SqliteConfig,
    StageBacklog,
    StageDef,
    StoredRun,
    Swept,
    TaskRecord,
    TaskState,
    TraceBatch,
    WorkflowDef,
    WorkflowPut,
)
from agentrun_server.storage.sqlite import SqliteStorage

__all__ = [
    "Ack",
    "AckCode",
    "AckResult",
    "ApiKeyRecord",
    "AttemptFailureRecord",
    "Cancelled",
    "ClaimRequest",
    "Collection",
    "CollectionPut",
    "Completion",
    "Deleted",
    "DoomedRun",
    "EndedLease",
    "Enqueued",
    "EventOutcome",
    "EventPage",
    "EventStatus",
    "Extension",
    "Facet",
    "Failure",
    "Fold",
    "Folded",
    "InsertOutcome",
    "InsertStatus",
    "LeaseHolder",
    "LeaseRef",
    "LeasedTask",
    "LeasedTaskOfRun",
    "LiveRunCounts",
    "LocalNotifier",
    "NewEvent",
    "NewRun",
    "NewSpan",
    "Notifier",
    "Page",
    "PollingNotifier",
    "PoolConfig",
    "Project",
    "Rebuild",
    "Release",
    "Revocation",
    "RevocationPage",
    "RunFilter",
    "RunQuery",
    "RunSelection",
    "RunSize",
    "SettledAndLeased",
    "SpansOutcome",
    "SqliteConfig",
    "SqliteStorage",
    "StageBacklog",
    "StageDef",
    "Storage",
    "StoredRun",
    "Swept",
    "TaskRecord",
    "TaskState",
    "TraceBatch",
    "WorkflowDef",
    "WorkflowPut",
    "backoff_seconds",
    "event_digest",
    "leased_message",
    "open_storage",
    "run_state",
]


class Storage(Protocol):
    """What the services need from storage: the contract every backend keeps.

    Every method is a coroutine; times are epoch seconds, passed in by the caller. Several
    storage objects, in one process or several, may share one database: every state change is
    one statement that re-checks the state it assumes and returns what moved, so two of them never
    lease one task at once nor accept a stale settle.

    Tasks: ready -> leased -> done | ready (retry, released, lease ended) | dead; ready, leased
    and dead -> cancelled; dead -> ready (redrive). At most one ready or leased task per run and
    workflow. A lease belongs to its lease id (the fencing token): any storage object may settle
    it; the Work session and server recorded with it only say who to tell when it is revoked, and
    whose silence detaches it.

    Settles (complete, fail, extend, release) answer each item with an `Ack`, in order: OK; a
    pathway the stage lacks or (from the servicer) an oversize output: INVALID_ARGUMENT, the
    lease kept; NOT_FOUND: no such task; FAILED_PRECONDITION: a stale lease. A settle repeated
    under the same lease (same pathway, for a completion) is answered OK again (`result`
    "repeat") while the task has not moved on.
    """

    async def close(self) -> None:
        """Release connections and threads; later calls fail."""

    def notifier(self) -> Notifier:
        """The notifier through which server processes on this database hear each other."""

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
        """Create a collection, or return the one with this name (created=False; its description,
        `enter_on_abandon` and `retention_days` as they were).

        Raises:
            NotFound: `workflow` is not empty and names no workflow.
            FailedPrecondition: the existing collection is bound to another workflow.
        """

    async def get_collection(self, id: str = "", name: str = "") -> Collection:
        """A collection by id, else by name, with its run count (kept, never counted).

        Raises:
            NotFound: no such collection.
        """

    async def list_collections(self) -> list[Collection]:
        """All collections, oldest first."""

    async def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> list[InsertOutcome]:
        """Store runs in one transaction, answering each in order: ACCEPTED; DUPLICATE (its id
        is stored in this collection, or earlier in the batch); CONFLICT (stored in another).
        When the collection is bound to a workflow, each accepted run enters the workflow's first
        stage in the same transaction.

        Raises:
            NotFound: no such collection (or its workflow vanished).
        """

    async def append_events(
        self, events: Sequence[NewEvent], fold: Fold, max_run_bytes: int, now: float
    ) -> list[EventOutcome]:
        """Apply live runs' events in order, in one transaction, answering each: STORED (a first
        event, sequence 1 with a collection, creates the run; `finish` writes the run whole with
        `fold` and enters it into its collection's workflow), DUPLICATE (a sequence number
        already stored), or REFUSED with the error: FailedPrecondition for a gap or an event
        after the run finished, NotFound for an unknown collection, AlreadyExists for a run of
        another collection or uploaded whole, ResourceExhausted past `max_run_bytes` of events,
        InvalidArgument when `fold` refuses the finished run."""

    async def events_after(
        self, run_id: str, after_sequence: int, limit: int, max_bytes: int | None = None
    ) -> EventPage:
        """A run's record (without its data) and up to `limit` of its events after
        `after_sequence`, as (sequence, patch), in order, stopping before the event that would
        take the patches over `max_bytes` (the first regardless): a page costs what it holds.

        Raises:
            NotFound: no such run.
        """

    async def enter_abandoned(
        self, abandoned_before: float, fold: Fold, limit: int, now: float
    ) -> list[str]:
        """Enter up to `limit` abandoned runs (no event since `abandoned_before`) of collections
        with `enter_on_abandon` into their workflow, oldest first, each as `fold` makes it from
        its events; return their ids. A run enters its workflow once: its finish, later, does
        not enter it again. One `fold` refuses (no transcript yet) never enters until it
        finishes. Replicas sweeping at once enter each run once."""

    async def run_collections(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The collection of each run named that exists, by run id (absent: no such run)."""

    async def count_live_runs(self, abandoned_before: float) -> dict[str, LiveRunCounts]:
        """(running, abandoned) live runs of each collection that has any, by collection id:
        running runs with an event since `abandoned_before`, and those without. Costs what the
        live runs cost, never what the finished ones do."""

    async def get_run(self, run_id: str) -> StoredRun:
        """One run.

        Raises:
            NotFound: no such run.
        """

    async def run_size(self, run_id: str) -> RunSize:
        """A run's collection and stored size (a live run: its events' patches), read without
        its data: whether it fits an answer.

        Raises:
            NotFound: no such run.
        """

    async def list_runs(
        self, query: RunQuery, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> Page[StoredRun]:
        """Up to `limit` runs that `query` lists after the one with seq `after_seq` (0: from the
        first), in its order, and whether more follow. The page stops before the run that would
        take its encoded size over `max_bytes` (the first run goes regardless). A page costs
        what it holds, whatever the collection's size, when the query has an equality filter
        or its matches are not rare (`storage._run_query`)."""

    async def backfill_facets(
        self, facets_of: Callable[[bytes], Sequence[Facet]], limit: int
    ) -> int:
        """Give up to `limit` runs stored before facets existed their facets (`facets_of` their
        encoded data); how many were read (0: none left). Every replica may run it at once."""

    async def count_runs(self, collection_id: str) -> int:
        """The runs of a collection (0 for an unknown one)."""

    # --- OpenTelemetry traces -------------------------------------------------------------------

    async def append_spans(
        self,
        batches: Sequence[TraceBatch],
        project: Project,
        fold: Fold,
        max_run_bytes: int,
        now: float,
    ) -> list[SpansOutcome]:
        """Append each batch of a trace's spans to the trace's live run (created by its first
        batch, in the batch's collection, which is made if it does not exist; later batches join
        the run there) as one event the server numbers, in one transaction for all the batches; an outcome per batch, in order. The
        spans not kept yet go, in start order, made into a patch by `project` from the state the
        trace's earlier batches left; spans already kept are duplicates (an exporter's retry
        stores nothing twice). A batch its run refuses stores nothing (`refused`: the run
        finished, or was uploaded whole, or would pass `max_run_bytes`); `fold` is the run's
        fold, as for `append_events`. Batches of one trace through several replicas take
        turns."""

    async def finish_quiet_traces(
        self, quiet_before: float, rebuild: Rebuild, max_run_bytes: int, limit: int, now: float
    ) -> list[str]:
        """Finish up to `limit` traces' runs whose root span has ended and whose last span came
        before `quiet_before`: each run written whole as `rebuild` makes it from every span in
        start order, entering its collection's workflow; the runs finished. A run `rebuild`
        refuses stays running (the live-run timeout abandons it). Replicas sweeping at once
        finish each run once."""

    # --- deletion -------------------------------------------------------------------------------

    async def update_collection(
        self, collection_id: str, description: str | None = None, retention_days: int | None = None
    ) -> Collection:
        """Set a collection's description and retention (None: kept); the collection after.

        Raises:
            NotFound: no such collection.
        """

    async def leased_tasks(self, selection: RunSelection) -> list[LeasedTaskOfRun]:
        """The leased tasks of the runs `selection` names: what stands in the way of deleting
        them unforced."""

    async def delete_runs(
        self, selection: RunSelection, force: bool, limit: int, now: float
    ) -> Deleted:
        """Delete up to `limit` of the runs `selection` names, oldest first, in one transaction:
        each with its events, facets, and tasks in every workflow (their failed attempts too,
        the ended tasks' kept counts lowered), off its collection's run count. `more`: the
        selection may hold more (call again). Forced, the leased tasks among them are cancelled
        first and their leases revoked (`revoked`), as `cancel` does.

        Raises:
            FailedPrecondition: unforced, a task of a chosen run is leased; nothing is deleted.
        """

    async def delete_collection(
        self, collection_id: str, force: bool, limit: int, now: float
    ) -> Deleted:
        """Delete up to `limit` of the collection's runs as `delete_runs` does, and the
        collection itself in the same transaction once none is left; `more` until it is gone.

        Raises:
            NotFound: no such collection.
            FailedPrecondition: as for `delete_runs`.
        """

    async def delete_expired(self, now: float, limit: int) -> list[DoomedRun]:
        """Delete up to `limit` runs stored longer ago than their collection's retention,
        oldest first per collection, passing over runs with a leased task (a task leased since
        is cancelled, its lease revoked); the runs deleted. Replicas sweeping at once delete
        each run once."""

    async def reclaim_space(self, max_bytes: int) -> int:
        """Give up to `max_bytes` of the space deleted rows left back to the file system; the
        bytes given back (SQLite, in incremental vacuum mode; PostgreSQL's autovacuum makes the
        space reusable on its own and this does nothing)."""

    # --- workflows ------------------------------------------------------------------------------

    async def put_workflow(
        self, workflow: WorkflowDef, now: float, force: bool = False
    ) -> WorkflowPut:
        """Store a definition (validated by the caller); a new version only if it changed. With
        `force`, the ready and leased tasks of stages it drops are cancelled in the same
        transaction (`WorkflowPut.cancelled`, its ended leases to revoke).

        Raises:
            FailedPrecondition: the new definition drops a stage that holds ready or leased tasks
                (not `force`); the message names each stage and its count.
            Unavailable: another definition was applied at the same moment; apply again.
        """

    async def get_workflow(self, name: str) -> WorkflowDef:
        """A workflow's current definition.

        Raises:
            NotFound: no such workflow.
        """

    async def list_workflows(self) -> list[WorkflowDef]:
        """All workflows by name."""

    # --- tasks: enqueue, claim, settle ----------------------------------------------------------

    async def enqueue(
        self, workflow_name: str, stage_name: str, run_ids: Sequence[str], priority: int, now: float
    ) -> Enqueued:
        """Create ready tasks for stored runs at a stage ("": the first); a run that has a ready
        or leased task in the workflow already is skipped.

        Raises:
            NotFound: unknown workflow, stage or run (nothing is enqueued).
        """

    async def claim(self, request: ClaimRequest, now: float) -> list[LeasedTask]:
        """Lease up to `request.limit` tasks ready by `now` of the request's stages (each within
        its own limit), highest priority first, FIFO within a priority, stopping before
        `request.max_bytes` of runs and inputs (the first regardless). Each lease gets a fresh
        lease id, the next attempt, and a deadline of now plus the request's lease duration (else
        the stage's). Only tasks still ready move."""

    async def complete(
        self, items: Sequence[Completion], now: float, holder: str = ""
    ) -> list[Ack]:
        """Complete leased tasks with a pathway and output, and create each one's next-stage
        task (its input: the output), all in one transaction. The Ack of a done task names the
        next task (`next_task_id`; none at the end of the workflow).

        `holder`, in every settle, is the Work session settling: a lease another live session
        holds is refused it (FAILED_PRECONDITION); one detached from its stream is not. "": any
        (the caller is no stream)."""

    async def complete_and_claim(
        self, items: Sequence[Completion], request: ClaimRequest, now: float
    ) -> SettledAndLeased:
        """`complete`, then `claim` for the same session, in one transaction: a worker that
        settles a batch gets its next without another round through the dispatcher (the
        session, `request.session_id`, is the completions' holder). `request.limit` counts the credits the completions free; each completion refused for its
        pathway keeps its lease (and credit), so it lowers the limit by one."""

    async def fail(self, items: Sequence[Failure], now: float, holder: str = "") -> list[Ack]:
        """Record failed attempts: dead when non-retryable or the attempts are spent, else ready
        again after the failure's retry-after or the stage's backoff (`result` "dead" or
        "retry")."""

    async def extend(self, items: Sequence[Extension], now: float, holder: str = "") -> list[Ack]:
        """Set lease deadlines to now plus each item's duration (None: the stage's); the Ack
        carries the new deadline."""

    async def release(self, items: Sequence[Release], now: float, holder: str = "") -> list[Ack]:
        """Hand leased tasks back unstarted: ready again at once, the attempt not counted."""

    # --- leases: streams, servers, expiry -------------------------------------------------------

    async def end_session_leases(self, session_id: str, now: float) -> list[EndedLease]:
        """End every lease a Work session holds, as its worker closed the stream on purpose: the
        attempts count (it may have died of a task); ready again, or dead when spent. (`release`
        hands a lease back at no cost; this spends the attempt.)"""

    async def detach_session(self, session_id: str, now: float) -> int:
        """Detach the leases of a Work session whose stream ended without handing them back
        (the worker vanished, or the server is shutting down): they stay leased, resumable by the
        worker on another stream until `sweep` ends them after the grace. Returns how many."""

    async def resume(
        self, holder: LeaseHolder, server_id: str, items: Sequence[LeaseRef], now: float
    ) -> list[Ack]:
        """Attach leases a worker still holds to its new session (`holder`, who holds them from
        now on): OK with the lease's deadline
        while the lease is current (`result` "resumed"); else NOT_FOUND or FAILED_PRECONDITION,
        and the worker must stop that task."""

    async def heartbeat(self, server_id: str, host: str, pid: int, now: float) -> None:
        """Record that a server process is alive; its leases are vouched for by this."""

    async def remove_server(self, server_id: str) -> None:
        """Forget a server shutting down (after it detached its sessions)."""

    async def sweep(self, now: float, grace_seconds: float) -> Swept:
        """End leases nobody will settle, counting the attempt (ready again, or dead when spent).
        Safe to run in every process at once: each lease ends once.

        - A server silent for `grace_seconds` is gone: its leases are detached as of its last
          heartbeat.
        - Expired: past their deadline (revoked from their stream, if any).
        - Recovered: detached for `grace_seconds` without a worker resuming them.
        """

    async def revocations_after(self, after_id: int) -> RevocationPage:
        """Revocations recorded after `after_id` (cancelled or expired leases of live streams,
        kept a minute), and the id to read after next time. `after_id` -1: none, just the id
        to start from."""

    async def change_marker(self) -> int | None:
        """A value that changes whenever another connection commits to the database, for a
        cheap "anything new?" poll; None when the backend cannot tell."""

    async def redrive(self, workflow: str, stage: str, task_ids: Sequence[int], now: float) -> int:
        """Move dead tasks (by id, else all of a workflow and optionally stage) back to ready
        with a fresh attempt budget; one whose run has a ready or leased task in the workflow
        again stays dead. Returns how many moved.

        Raises:
            InvalidArgument: neither ids nor a workflow.
        """

    async def cancel(
        self, workflow: str, stage: str, task_ids: Sequence[int], now: float
    ) -> Cancelled:
        """Cancel ready, leased and dead tasks (by id, else all of a workflow and optionally
        stage); return how many, and the leases that ended (revoked from their streams).

        Raises:
            InvalidArgument: neither ids nor a workflow.
        """

    # --- tasks: reads ---------------------------------------------------------------------------

    async def has_active(self, workflow: str, stages: Sequence[str]) -> bool:
        """Whether any of the stages has a ready (now or scheduled) or leased task."""

    async def backlog(self, workflow_name: str, now: float) -> list[StageBacklog]:
        """Task counts per stage of one workflow (all workflows when empty), in definition order,
        and the age of each stage's oldest ready task. Costs what the ready and leased tasks
        cost, never what the finished ones do."""

    async def get_task(self, task_id: int) -> TaskRecord:
        """One task with its failed attempts.

        Raises:
            NotFound: no such task.
        """

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
        """Up to `limit` tasks with id > `after_id`, filtered where arguments are set (a run's
        tasks through every workflow, by `agent_run_id`, cost what they hold), and
        whether more follow; the page stops before the task whose input and output would take it
        over `max_bytes` (the first regardless)."""

    # --- API keys -------------------------------------------------------------------------------

    async def create_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        """Store a new key entry (its `created_at` as given; never used, never revoked).

        Raises:
            AlreadyExists: a key of this name exists (revoked ones too), or a live entry for the
                same certificate subject.
        """

    async def list_keys(self) -> list[ApiKeyRecord]:
        """Every key entry, revoked ones included, by name."""

    async def revoke_key(self, name: str, now: float) -> ApiKeyRecord:
        """Revoke a key (a no-op on a revoked one) and return it.

        Raises:
            NotFound: no key of this name.
        """

    async def keys_version(self) -> int:
        """A number that grows whenever a key is created or revoked: servers poll it to reload."""

    async def touch_keys(self, used: dict[str, float]) -> None:
        """Record last-use times, by key name (an earlier time never overwrites a later one)."""


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


async def open_storage(
    url: str, pool: PoolConfig | None = None, sqlite: SqliteConfig | None = None
) -> Storage:
    """Open the store a URL names, applying pending migrations: `sqlite:///relative.db`,
    `sqlite:////abs/path.db` or a path (SQLite, with `sqlite`'s durability);
    `postgresql://USER@HOST:PORT/DBNAME` or `postgres://...` (PostgreSQL, with `pool`'s limits).

    Raises:
        InvalidArgument: an unsupported scheme, or PostgreSQL without its driver installed.
        Unavailable: the PostgreSQL server cannot be reached.
    """
    if url.startswith(POSTGRES_SCHEMES):
        try:
            from agentrun_server.storage.postgres import PostgresStorage
        except ImportError as exc:
            raise InvalidArgument(
                f"--db: PostgreSQL needs its driver: pip install 'agentrun-grpc[postgres]' ({exc})"
            ) from None
        storage: Storage = PostgresStorage(url, pool)
        await storage.open()  # type: ignore[attr-defined]  # open() is each backend's own
        return storage
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://").removeprefix("/") or ":memory:"
    elif "://" in url:
        scheme = url.split("://", 1)[0]
        raise InvalidArgument(
            f"--db: unsupported database scheme {scheme!r}; use sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DBNAME"
        )
    else:
        path = url
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    store = SqliteStorage(path, sqlite or SqliteConfig())
    await store.open()
    return store
