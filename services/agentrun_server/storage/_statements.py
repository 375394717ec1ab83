"""The statements one storage transaction runs: the driver interface each engine implements.

The procedures (`storage._procedures`) are written once against `Statements`: they read, decide
with `storage._rules`, and write, inside the one transaction the engine opens around each call. An
engine implements every statement in its own SQL, one statement or the fewest its dialect needs,
and decides nothing: each write is guarded (it moves only rows still in the state it assumes) and
says what moved. Four duties are the engine's, never a procedure's:

- **Locks**: a read marked "locked" holds its rows until the transaction ends where the engine
  has row locks (PostgreSQL; "skipping" ones pass over rows another transaction holds, so that
  replicas sweeping or claiming at once take different rows). SQLite's write transaction holds
  the whole database, so its reads need none.
- **Counts**: a statement that moves tasks into or out of done, dead or cancelled keeps the
  `task_counts` table (the backlog's ended tasks) in step, in the same transaction.
- **Time**: `now` is the caller's clock, in epoch seconds; PostgreSQL statements use the
  database's own instead (one clock for every replica), unless opened with the caller's (tests).
- **Notices**: `notify_*` tell the other server processes on the database, at commit (PostgreSQL's
  NOTIFY). SQLite's are no-ops: its notifier polls (`storage._notifier.PollingNotifier`).

Rows come back as the records of `storage._types` and the small tuples below; the column lists
and row shapes every dialect reads are here too, once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from agentrun_server.storage._rules import Candidate, SettleRow
from agentrun_server.storage._types import (
    ApiKeyRecord,
    AttemptFailureRecord,
    Collection,
    Completion,
    DoomedRun,
    EndedLease,
    Facet,
    LeasedTask,
    LeasedTaskOfRun,
    LeaseHolder,
    NewEvent,
    NewRun,
    NewSpan,
    Release,
    Revocation,
    RunQuery,
    RunSelection,
    StageDef,
    StoredRun,
    TaskRecord,
    TaskState,
    TraceState,
    WorkflowDef,
)

COLLECTION_COLUMNS = (
    "id, name, description, workflow, created_at, run_count, enter_on_abandon, retention_days"
)
RUN_COLUMNS = "id, collection_id, ingested_at, data, seq, state, updated_at, next_sequence"
SETTLE_COLUMNS = "id, state, lease_id, workflow, stage, attempt, max_attempts, pathway"
TASK_COLUMNS = (
    "id, workflow, stage, agent_run_id, collection_id, state, attempt, max_attempts, priority, "
    "created_at, ready_at, lease_deadline, pathway, output, input, previous_task_id, holder"
)
ENDED_STATES = ("done", "dead", "cancelled")
"""The task states whose counts `task_counts` keeps."""
KEY_COLUMNS = (
    "name, scopes, collections, workflows, token_hash, subject, created_at, revoked_at, "
    "last_used_at, expires_at"
)


def collection_record(row: Sequence[Any]) -> Collection:
    """A `Collection` from a row of COLLECTION_COLUMNS."""
    id, name, description, workflow, created_at, run_count, enter_on_abandon, retention = row
    return Collection(
        id, name, description, workflow, created_at, run_count, bool(enter_on_abandon), retention
    )


def task_record(row: Sequence[Any], failures: Sequence[AttemptFailureRecord]) -> TaskRecord:
    """A `TaskRecord` from a row of TASK_COLUMNS and its failed attempts."""
    fields = [*row[:5], TaskState(row[5]), *row[6:-1], LeaseHolder.decode(row[-1]), tuple(failures)]
    return TaskRecord(*fields)


def failure_record(row: Sequence[Any]) -> AttemptFailureRecord:
    """An `AttemptFailureRecord` from a row of (attempt, error, failed_at, holder)."""
    attempt, error, failed_at, holder = row
    return AttemptFailureRecord(attempt, error, failed_at, LeaseHolder.decode(holder))


def key_record(row: Sequence[Any]) -> ApiKeyRecord:
    """An `ApiKeyRecord` from a row of KEY_COLUMNS (lists stored as JSON text)."""
    name, scopes, collections, workflows, *rest = row
    return ApiKeyRecord(
        str(name),
        tuple(json.loads(scopes)),
        tuple(json.loads(collections)),
        tuple(json.loads(workflows)),
        *rest,
    )


class LiveRunRow(NamedTuple):
    """What appending an event needs to know of its run."""

    collection_id: str
    state: str
    next_sequence: int
    """0: the run was uploaded whole."""
    size_bytes: int
    entered_at: float | None


class NewLease(NamedTuple):
    """A lease to grant: the task, its fresh lease id (the fencing token), and its duration."""

    task_id: int
    lease_id: str
    seconds: float


class LeaseEnd(NamedTuple):
    """A lease to end unsettled, and whether its task is dead after it (else ready again)."""

    row: SettleRow
    dead: bool


class CancelledTask(NamedTuple):
    """A task a cancel moved, with the state and lease it had."""

    task_id: int
    state: str
    lease_id: str | None
    session_id: str | None
    workflow: str
    stage: str


class ActiveCounts(NamedTuple):
    """A stage's ready (with scheduled) and leased tasks, and its oldest ready task's age."""

    stage: str
    ready: int
    """Every ready task, the scheduled ones too."""
    scheduled: int
    """Ready tasks whose time has not come."""
    oldest_ready_age_seconds: float | None
    leased: int


class TaskSelection(NamedTuple):
    """The tasks a cancel or redrive names: by id, else every one of a workflow's stages."""

    task_ids: Sequence[int]
    workflow: str
    stages: Sequence[str]


class TaskFilter(NamedTuple):
    """What a page of tasks keeps ("" or None: any)."""

    workflow: str
    stage: str
    state: TaskState | None
    agent_run_id: str = ""


class Statements(Protocol):
    """The statements of one transaction, as one engine writes them (see the module docstring)."""

    # --- collections and runs -------------------------------------------------------------------

    async def insert_collection(
        self, id: str, name: str, description: str, workflow: str, abandon: bool, now: float
    ) -> float | None:
        """Create a collection; its creation time, or None when the name is taken."""

    async def collection(self, column: str, key: str) -> Collection | None:
        """The collection whose `column` ("id" or "name") is `key`."""

    async def collections(self) -> list[Collection]:
        """Every collection, oldest first."""

    async def collection_workflow(self, collection_id: str) -> str | None:
        """The workflow a collection is bound to ("": none); None: no such collection."""

    async def add_run_count(self, collection_id: str, runs: int) -> None:
        """Count `runs` more runs in a collection (last in a transaction: it locks the row)."""

    async def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> dict[str, int]:
        """Insert runs (unique ids) whose ids are not stored; the seq of each id inserted."""

    async def insert_facets(self, collection_id: str, rows: Sequence[tuple[int, Facet]]) -> None:
        """Store facets of runs, by run seq (a facet stored already is kept)."""

    async def run_seq(self, run_id: str) -> int | None:
        """A run's seq, if it is stored."""

    async def facet_backfill(self) -> tuple[int, int]:
        """(done, through): runs up to `done` of those up to `through` have their facets."""

    async def runs_between(self, after_seq: int, through: int, limit: int) -> list[StoredRun]:
        """Up to `limit` runs after `after_seq` through `through`, in order, with their data."""

    async def advance_facet_backfill(self, done: int, to: int) -> bool:
        """Record runs up to `to` indexed, if the record still says `done` (another replica may
        have moved it); whether it moved."""

    async def run_collections(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The collection of each stored run named, by run id."""

    async def run(self, run_id: str) -> StoredRun | None:
        """One run, with its data."""

    async def run_size(self, run_id: str) -> tuple[str, int] | None:
        """A run's collection id and stored size, without its data."""

    async def run_sizes(self, query: RunQuery, after_seq: int, limit: int) -> list[tuple[int, int]]:
        """(seq, encoded size) of up to `limit` runs `query` lists after `after_seq`, in its
        order (`storage._run_query`)."""

    async def runs_through(self, query: RunQuery, after_seq: int, last_seq: int) -> list[StoredRun]:
        """The runs `run_sizes` listed, from after `after_seq` through `last_seq`, in order."""

    async def run_count(self, collection_id: str) -> int:
        """A collection's kept run count (0: no such collection)."""

    # --- OpenTelemetry traces -------------------------------------------------------------------

    async def open_trace(self, run_id: str, now: float) -> None:
        """Make the trace's row unless it exists."""

    async def trace(self, run_id: str) -> TraceState | None:
        """The trace's row (locked)."""

    async def stored_spans(self, run_id: str, span_ids: Sequence[str]) -> set[str]:
        """Those of `span_ids` kept for the run already."""

    async def insert_spans(self, run_id: str, spans: Sequence[NewSpan]) -> None:
        """Keep the spans (none is kept yet)."""

    async def update_trace(self, run_id: str, state: bytes, root_ended: bool, now: float) -> None:
        """Record the trace's new state; its last span came `now`."""

    async def traces_to_finish(self, quiet_before: float, limit: int) -> list[str]:
        """Up to `limit` unfinished traces whose root ended and whose last span came before
        `quiet_before`, oldest first (locked, skipping)."""

    async def trace_spans(self, run_id: str) -> list[bytes]:
        """Every span kept for the run, in start order."""

    async def finish_trace(self, run_id: str) -> None:
        """Mark the trace finished."""

    # --- deletion -------------------------------------------------------------------------------

    async def update_collection(
        self, collection_id: str, description: str | None, retention_days: int | None
    ) -> bool:
        """Set the fields given (None: kept); whether the collection exists."""

    async def retained_collections(self) -> list[tuple[str, int]]:
        """(id, retention_days) of the collections that keep runs for a number of days."""

    async def runs_to_delete(
        self, selection: RunSelection, limit: int, skip_leased: bool
    ) -> list[DoomedRun]:
        """Up to `limit` runs `selection` names, oldest first (locked, skipping); without those
        a task of which is leased when `skip_leased`."""

    async def leased_tasks(self, selection: RunSelection) -> list[LeasedTaskOfRun]:
        """The leased tasks of the runs `selection` names (locked)."""

    async def delete_runs(self, runs: Sequence[DoomedRun]) -> int:
        """Delete the runs with their events, facets, tasks (counts kept) and tasks' failures,
        and take them off their collections' run counts; how many tasks went."""

    async def delete_collection(self, collection_id: str) -> bool:
        """Delete the collection if it holds no run (any more); whether it went."""

    # --- live runs ------------------------------------------------------------------------------

    async def live_run(self, run_id: str) -> LiveRunRow | None:
        """A run about to take an event, locked."""

    async def stored_event(self, run_id: str, sequence: int) -> tuple[bytes | None, bytes] | None:
        """(digest, patch) of the event stored under a run's sequence number."""

    async def event_patches(self, run_id: str) -> list[bytes]:
        """The patches of a run's events, in order."""

    async def open_live_run(self, event: NewEvent, now: float) -> bool:
        """Create a running run from its first event (not the event itself); False when a run
        of that id exists (another replica created it meanwhile)."""

    async def advance_live_run(self, run_id: str, expected: int, size: int, now: float) -> None:
        """The run's next sequence past `expected`, its event bytes `size`, updated now."""

    async def insert_event(self, event: NewEvent, now: float) -> None:
        """Store an event."""

    async def finish_run(
        self, run_id: str, data: bytes, name: str | None, enters: bool, now: float
    ) -> None:
        """Write a finished run whole; `enters`: it enters its workflow now (entered_at)."""

    async def abandoned_to_enter(self, before: float, limit: int) -> list[tuple[str, str]]:
        """(run id, collection id) of up to `limit` runs with no event since `before`, not yet
        entered, of collections that enter abandoned runs into a workflow; oldest first, locked,
        skipping."""

    async def enter_abandoned_run(
        self, run_id: str, data: bytes | None, name: str | None, now: float
    ) -> None:
        """Record an abandoned run entered now with the run its events make; `data` None: it
        has nothing a stage could work on (`_rules.NOTHING_TO_ENTER`) and enters when it
        finishes."""

    async def run_header(self, run_id: str) -> StoredRun | None:
        """A run without its data."""

    async def events_after(self, run_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        """(sequence, patch) of up to `limit` of a run's events after `after`, in order."""

    async def event_sizes(self, run_id: str, after: int, limit: int) -> list[int]:
        """The patch sizes of up to `limit` of a run's events after `after`, in order, read
        without the patches."""

    async def live_run_counts(self, before: float) -> list[tuple[str, int, int]]:
        """(collection id, running, abandoned) of each collection with live runs not finished:
        running with an event since `before`, and without."""

    async def notify_events(self, run_ids: Sequence[str]) -> None:
        """Tell the other processes these runs got events."""

    # --- workflows ------------------------------------------------------------------------------

    async def workflow_version(self, name: str) -> int | None:
        """A workflow's stored version."""

    async def workflow(self, name: str) -> WorkflowDef | None:
        """A workflow's stored definition."""

    async def workflow_to_change(self, name: str) -> tuple[int, str] | None:
        """(version, definition JSON) of a workflow about to change, locked."""

    async def stages_holding_tasks(
        self, workflow: str, outside: Sequence[str]
    ) -> list[tuple[str, int]]:
        """(stage, count) of a workflow's ready and leased tasks in stages not in `outside`."""

    async def store_workflow(self, name: str, version: int, definition: str, now: float) -> bool:
        """Store `version` of a definition if the stored one is `version - 1` (or none);
        whether it was stored."""

    async def workflow_names(self) -> list[str]:
        """Every workflow's name, in order."""

    async def counted_stages(self, workflow: str) -> list[str]:
        """The stages a workflow's ended tasks are counted in."""

    # --- tasks: enter, claim, settle ------------------------------------------------------------

    async def enter_tasks(
        self,
        workflow: str,
        stage: StageDef,
        runs: Sequence[tuple[str, str]],
        priority: int,
        now: float,
    ) -> int:
        """Create a ready task at `stage` for each (run id, collection id) that has no ready or
        leased task in the workflow; how many were created."""

    async def claim_candidates(
        self, workflow: str, limits: Mapping[str, int], now: float
    ) -> list[Candidate]:
        """Each stage's first ready tasks (up to its limit) in dispatch order, locked, skipping."""

    async def lease_tasks(
        self, leases: Sequence[NewLease], holder: LeaseHolder, server_id: str, now: float
    ) -> list[LeasedTask]:
        """Lease the tasks still ready to a Work session (`holder.session_id`); the leases
        granted, with their runs."""

    async def settle_rows(self, task_ids: Sequence[int]) -> dict[int, SettleRow]:
        """The tasks named, by id (absent: no such task)."""

    async def settle_row(self, task_id: int, lease_id: str) -> SettleRow | None:
        """One task, with the error of a failure on record under `lease_id`."""

    async def successors(self, task_ids: Sequence[int]) -> dict[int, int]:
        """The task each of `task_ids` made in the next stage when it was completed, by id
        (absent: it made none)."""

    async def complete_tasks(
        self,
        done: Sequence[Completion],
        rows: Mapping[int, SettleRow],
        follow: Mapping[int, StageDef],
        now: float,
    ) -> dict[int, int | None]:
        """Mark done the tasks still leased under the lease given, and create the next stage's
        task (`follow`, by task id; its input the output) of each that moved; by the id of each
        task that moved, its next task's id (None: none, or one was active already). Tells the
        other processes of the tasks created."""

    async def end_attempt(self, row: SettleRow, dead: bool, delay: float, now: float) -> bool:
        """Move a task still leased under `row.lease_id` to dead, or ready after `delay` s;
        whether it moved."""

    async def record_failure(
        self, task_id: int, attempt: int, lease_id: str | None, error: str, now: float
    ) -> None:
        """Put a failed attempt on record (a redriven task's replaces its old one), with the
        task's lease holder."""

    async def extend_lease(
        self, task_id: int, lease_id: str, seconds: float, now: float
    ) -> float | None:
        """Set a lease's deadline to `seconds` from now; the deadline, or None (not current)."""

    async def release_lease(self, item: Release, holder: str, now: float) -> tuple[str, str] | None:
        """Hand a task back ready (after the item's delay), the attempt not counted, keeping its
        lease id until it is leased again; (workflow, stage) if it moved. `holder`: the session
        that may release it ("": any)."""

    async def notify_ready(self, workflow: str) -> None:
        """Tell the other processes that tasks of `workflow` may be ready."""

    # --- leases ---------------------------------------------------------------------------------

    async def session_leases(self, session_id: str) -> list[SettleRow]:
        """The leases a Work session holds, locked, skipping."""

    async def expired_leases(self, now: float) -> list[SettleRow]:
        """The leases past their deadline, locked, skipping."""

    async def unresumed_leases(self, now: float, grace_seconds: float) -> list[SettleRow]:
        """The leases detached for `grace_seconds`, locked, skipping."""

    async def end_leases(self, ends: Sequence[LeaseEnd], why: str, now: float) -> set[int]:
        """End leases still current: the task dead or ready again, the attempt on record as
        failed with `why`; the ids of the tasks that moved."""

    async def detach_leases(self, session_id: str, now: float) -> int:
        """Detach a Work session's leases as of now; how many."""

    async def attach_lease(
        self, task_id: int, lease_id: str, holder: LeaseHolder, server_id: str
    ) -> tuple[float, str] | None:
        """Attach a current lease to a Work session (`holder.session_id`), the new holder;
        (deadline, stage), or None."""

    async def record_heartbeat(self, server_id: str, host: str, pid: int, now: float) -> None:
        """Note that a server process is alive now."""

    async def delete_server(self, server_id: str) -> None:
        """Forget a server process."""

    async def detach_silent_servers(self, now: float, grace_seconds: float) -> None:
        """Forget the servers silent for `grace_seconds`, their leases detached as of their last
        heartbeat."""

    async def record_revocations(
        self, leases: Sequence[EndedLease], reason: str, now: float
    ) -> None:
        """Record revocations of leases live streams held (every one has a session)."""

    async def notify_revoked(self) -> None:
        """Tell the other processes that leases were revoked."""

    async def forget_revocations(self, now: float, kept_seconds: float) -> None:
        """Delete the revocations older than `kept_seconds`."""

    async def revocations_after(self, after_id: int) -> list[tuple[int, Revocation]]:
        """(id, revocation) of those recorded after `after_id`, in order."""

    async def last_revocation_id(self) -> int:
        """The newest revocation's id (0: none)."""

    async def cancel_tasks(self, selection: TaskSelection, now: float) -> list[CancelledTask]:
        """Cancel the selected ready, leased and dead tasks; the tasks moved, as they were."""

    async def redrive_tasks(self, selection: TaskSelection, now: float) -> list[tuple[str, str]]:
        """Make the selected dead tasks ready with a fresh attempt budget, unless their run has
        a ready or leased task in the workflow (one dead task per run); (workflow, stage) of each
        moved."""

    # --- reads ----------------------------------------------------------------------------------

    async def ended_counts(self, workflow: str) -> list[tuple[str, str, int]]:
        """(stage, state, count) of a workflow's ended tasks, as kept."""

    async def active_counts(
        self, workflow: str, stages: Sequence[str], now: float
    ) -> list[ActiveCounts]:
        """The ready and leased tasks of each stage, counted off their index ranges."""

    async def has_active(self, workflow: str, stages: Sequence[str]) -> bool:
        """Whether any of the stages has a ready or leased task."""

    async def task(self, task_id: int) -> TaskRecord | None:
        """One task with its failed attempts."""

    async def task_sizes(
        self, where: TaskFilter, after_id: int, limit: int
    ) -> list[tuple[int, int]]:
        """(id, input and output bytes) of up to `limit` tasks after `after_id`, in order."""

    async def tasks_through(
        self, where: TaskFilter, after_id: int, last_id: int
    ) -> list[TaskRecord]:
        """The tasks `task_sizes` listed, after `after_id` through `last_id`, with failures."""

    # --- API keys -------------------------------------------------------------------------------

    async def insert_key(self, key: ApiKeyRecord) -> ApiKeyRecord | None:
        """Store a key entry; None when its name (or live subject) is taken."""

    async def keys(self) -> list[ApiKeyRecord]:
        """Every key entry, by name."""

    async def key(self, name: str) -> ApiKeyRecord | None:
        """One key entry."""

    async def revoke_key(self, name: str, now: float) -> None:
        """Revoke a key not revoked yet."""

    async def keys_version(self) -> int:
        """A number that grows with every key created or revoked."""

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        """Record last-use times, never moving one back."""
