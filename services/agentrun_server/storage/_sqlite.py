"""SQLite storage (WAL): the embedded default.

Calls run on one dedicated storage thread holding one connection, so writes are serialized in the
process the way SQLite wants them; several processes may share the file (WAL, busy timeout). Each
batch is one `BEGIN IMMEDIATE` transaction.

The Work stream's small settle and claim batches take a hot path instead (`_hot_path`): they run
on the event loop's own thread, on a second connection, taking turns with the storage thread
through a lock the loop never blocks on. Handing a 1-2 ms transaction to a thread costs more than
it saves: the two threads contend for the GIL at every row SQLite steps (about a quarter of the
orchestrator's throughput, measured by bench/bench_orchestrate.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from typing import Any, ParamSpec, TypeVar

from agentrun_server._errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
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
    StoredRun,
    TaskRecord,
    TaskState,
    WorkflowDef,
)

_log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

BUSY_TIMEOUT_SECONDS = 30.0
CHECKPOINT_INTERVAL_SECONDS = 1.0
MAX_SQL_PARAMETERS = 32_766
_LOOKUP_IDS = 1000  # ids per IN (...) lookup, far under MAX_SQL_PARAMETERS
_INSERT_ROWS = 1000  # rows per multi-row VALUES list (3 parameters each)
_JITTER = 0.2
HOT_PATH_MAX_TASKS = 256
"""The most tasks (settled plus claimed) a call may touch on the hot path: it blocks the event loop
for its whole transaction, about 10 us per task."""


def _in_thread(method: Callable[..., T]) -> Callable[..., Any]:
    """Run a sync method on the storage thread; the public method is a coroutine.

    A database locked by another process past the busy timeout becomes `Unavailable` (retry).
    """

    @functools.wraps(method)
    async def wrapper(self: SqliteStorage, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(self._locked, method, *args, **kwargs)
            )
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            raise Unavailable(
                f"storage: {exc} (another process held it over {BUSY_TIMEOUT_SECONDS:.0f} s)"
            ) from exc

    return wrapper


def _hot_path(tasks: Callable[..., int]) -> Callable[[Callable[..., T]], Callable[..., Any]]:
    """Like `_in_thread`, but run on the event loop's own thread, on its own connection, when the
    call touches at most HOT_PATH_MAX_TASKS tasks (`tasks(*args)` counts them).

    The loop never blocks on the storage thread: while that is in a call, the hot call awaits its
    end. Nor on another process: the loop's connection has no busy timeout, so when another
    process holds the write lock the call goes to the storage thread, which waits for it.
    """

    def decorate(method: Callable[..., T]) -> Callable[..., Any]:
        threaded = _in_thread(method)

        @functools.wraps(method)
        async def wrapper(self: SqliteStorage, *args: Any, **kwargs: Any) -> T:
            loop = asyncio.get_running_loop()
            if loop is self._loop and tasks(*args, **kwargs) <= HOT_PATH_MAX_TASKS:
                while True:
                    self._unlocked.clear()
                    if self._lock.acquire(blocking=False):
                        break
                    await self._unlocked.wait()
                try:
                    return method(self, *args, **kwargs)
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc):
                        raise
                    # Rolled back: wait for the other process on the storage thread.
                finally:
                    self._lock.release()
            result: T = await threaded(self, *args, **kwargs)
            return result

        return wrapper

    return decorate


def _within(sizes: Sequence[int], limit: int, max_bytes: int | None) -> tuple[int, bool]:
    """How many of the first items to take, and whether more follow: at most `limit` items whose
    sizes sum to at most `max_bytes`, the first item regardless. For a page, `sizes` holds up to
    `limit + 1` items, so that one more tells there are more."""
    kept, total = 0, 0
    for size in sizes[:limit]:
        total += size
        if kept and max_bytes is not None and total > max_bytes:
            return kept, True
        kept += 1
    return kept, len(sizes) > limit


def _select_in(
    db: sqlite3.Connection, sql: str, ids: Sequence[Any], *args: Any
) -> Iterator[tuple[Any, ...]]:
    """The rows of `sql`, whose `{ids}` is an `IN` list, run over `_LOOKUP_IDS` of `ids` at a time
    (SQLite caps the parameters of a statement); `args` bind before the ids."""
    for start in range(0, len(ids), _LOOKUP_IDS):
        lookup = list(ids[start : start + _LOOKUP_IDS])
        yield from db.execute(sql.format(ids=",".join("?" * len(lookup))), [*args, *lookup])


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _stale(task_id: int, lease_id: str, row: tuple[Any, ...] | None) -> Ack | None:
    """The error Ack for settling a task under `lease_id`, or None when that lease is current.

    `row` starts with the task's state, lease id, workflow and stage (None: no such task).
    """
    if row is None:
        return Ack(task_id, lease_id, AckCode.NOT_FOUND, f"no task with id {task_id}")
    state, current = row[0], row[1]
    if state == "leased" and current == lease_id:
        return None
    return Ack(
        task_id,
        lease_id,
        AckCode.FAILED_PRECONDITION,
        f"stale lease: task {task_id} is {state}"
        + (" under another lease" if current not in (None, lease_id) else ""),
        stage=row[3],
    )


def backoff_seconds(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retrying after failed attempt `attempt` (from 1): doubling, +-20 % jitter."""
    base = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return base * random.uniform(1 - _JITTER, 1 + _JITTER)


class SqliteStorage:
    """Storage in one SQLite file. `path` ":memory:" keeps everything in memory (tests only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentrun-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._local = threading.local()  # .conn: the connection of the thread running a call
        # The hot path: its loop and connection, once open. The lock makes the loop and the
        # storage thread take turns, so neither ever meets the other's write lock in SQLite.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._unlocked = asyncio.Event()  # set on the loop after each storage thread call
        self._workflows: dict[str, WorkflowDef] = {}
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating it) and apply pending migrations."""
        await self._open()
        if self.path != ":memory:":  # a second connection would open a second database
            self._loop_conn = self._local.conn = self._connect(busy_timeout_seconds=0)
            self._loop = asyncio.get_running_loop()

    def _locked(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a call on the storage thread, taking turns with the hot path."""
        try:
            with self._lock:
                return method(self, *args, **kwargs)
        finally:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._unlocked.set)

    def _connect(self, busy_timeout_seconds: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        # SQLite's default since 3.32; some builds allow more (Debian's: 250,000). Pinned, so a
        # statement that runs here runs on every build (statements here stay far under it).
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_SQL_PARAMETERS)
        if self.path != ":memory:":
            # A commit that crosses the WAL's auto-checkpoint mark copies the WAL into the file
            # and fsyncs it: ~3-10 ms inside one unlucky request, on whichever connection wrote.
            # No connection of ours does that; `_checkpoint_loop` does, on a thread of its own.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    @_in_thread
    def _open(self) -> None:
        conn = self._connect(BUSY_TIMEOUT_SECONDS)
        self._conn = self._local.conn = conn
        self._migrate()
        if self.path != ":memory:":
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="agentrun-sqlite-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """PASSIVE checkpoints every CHECKPOINT_INTERVAL_SECONDS on a connection of its own: they
        never wait for the writer, and the WAL restarts from the top once all of it is copied."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        try:
            while not self._closing.wait(CHECKPOINT_INTERVAL_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    _log.exception("WAL checkpoint failed; retrying")
        finally:
            conn.close()

    async def close(self) -> None:
        """Stop checkpointing, close the connections and stop the storage thread."""
        self._closing.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
        await self._close()  # as every storage thread call, it wakes hot calls waiting their turn
        self._executor.shutdown(wait=True)
        if self._loop_conn is not None:
            self._loop = None  # later calls go to the stopped storage thread, and fail
            self._loop_conn.close()
            self._loop_conn = self._local.conn = None

    @_in_thread
    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = self._local.conn = None

    @property
    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            raise RuntimeError("storage is not open")
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate(self) -> None:
        scripts = sorted(
            (p for p in (resources.files(__package__) / "sql" / "sqlite").iterdir()),
            key=lambda p: p.name,
        )
        with self._transaction() as db:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            for script in scripts:
                version = int(script.name.split("_", 1)[0])
                if version <= current:
                    continue
                statement = ""
                for line in script.read_text().splitlines(keepends=True):
                    statement += line
                    if sqlite3.complete_statement(statement):
                        db.execute(statement)
                        statement = ""
                db.execute(f"PRAGMA user_version = {version}")

    # --- collections ----------------------------------------------------------------------------

    @staticmethod
    def _collection(row: sqlite3.Row | tuple[Any, ...]) -> Collection:
        return Collection(*row)

    _COLLECTION_COLUMNS = (
        "c.id, c.name, c.description, c.workflow, c.created_at, "
        "(SELECT COUNT(*) FROM agent_runs r WHERE r.collection_id = c.id)"
    )

    @_in_thread
    def create_collection(
        self, name: str, description: str, workflow: str, now: float
    ) -> tuple[Collection, bool]:
        """Create a collection, or return the one with this name (created=False).

        Raises:
            NotFound: `workflow` is not empty and names no workflow.
            FailedPrecondition: the existing collection is bound to another workflow.
        """
        with self._transaction() as db:
            if workflow:
                self._workflow(db, workflow)
            row = db.execute(
                f"SELECT {self._COLLECTION_COLUMNS} FROM collections c WHERE c.name = ?", (name,)
            ).fetchone()
            if row is not None:
                existing = self._collection(row)
                if workflow and existing.workflow != workflow:
                    bound = repr(existing.workflow) if existing.workflow else "no workflow"
                    raise FailedPrecondition(
                        f"collection {name!r} exists bound to {bound}, not {workflow!r}"
                    )
                return existing, False
            collection = Collection(str(uuid.uuid4()), name, description, workflow, now)
            db.execute(
                "INSERT INTO collections (id, name, description, workflow, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (collection.id, name, description, workflow, now),
            )
            return collection, True

    @_in_thread
    def get_collection(self, id: str = "", name: str = "") -> Collection:
        """Return a collection by id or name.

        Raises:
            NotFound: no such collection.
        """
        column, key = ("id", id) if id else ("name", name)
        row = self._db.execute(
            f"SELECT {self._COLLECTION_COLUMNS} FROM collections c WHERE c.{column} = ?", (key,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no collection with {column} {key!r}")
        return self._collection(row)

    @_in_thread
    def list_collections(self) -> list[Collection]:
        """Return all collections, oldest first."""
        rows = self._db.execute(
            f"SELECT {self._COLLECTION_COLUMNS} FROM collections c ORDER BY c.created_at, c.id"
        ).fetchall()
        return [self._collection(r) for r in rows]

    # --- runs -----------------------------------------------------------------------------------

    @_in_thread
    def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> list[InsertOutcome]:
        """Store runs in one transaction; a run whose id is stored already stores nothing.

        When the collection is bound to a workflow, each accepted run enters the workflow's first
        stage in the same transaction.

        Raises:
            NotFound: no such collection (or its workflow vanished).
        """
        with self._transaction() as db:
            row = db.execute(
                "SELECT workflow FROM collections WHERE id = ?", (collection_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no collection with id {collection_id!r}")
            workflow = self._workflow(db, row[0]) if row[0] else None
            # Which ids are stored already: one indexed lookup per slice. The rest are inserted
            # with one executemany (a repeat of an id within the batch is a duplicate).
            owners: dict[str, str] = dict(
                _select_in(
                    db,
                    "SELECT id, collection_id FROM agent_runs WHERE id IN ({ids})",
                    [run.id for run in runs],
                )
            )
            outcomes = []
            accepted = []
            rows = []
            for run in runs:
                owner = owners.get(run.id)
                if owner is None:
                    owners[run.id] = collection_id
                    outcomes.append(InsertOutcome(InsertStatus.ACCEPTED))
                    accepted.append(run.id)
                    rows.append((run.id, collection_id, run.name, len(run.data), now, run.data))
                elif owner == collection_id:
                    outcomes.append(InsertOutcome(InsertStatus.DUPLICATE))
                else:
                    outcomes.append(InsertOutcome(InsertStatus.CONFLICT, owner))
            db.executemany(
                "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            if workflow is not None and accepted:
                stage = workflow.first_stage
                db.executemany(
                    "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
                    "max_attempts, created_at, ready_at) VALUES (?, ?, ?, ?, 'ready', ?, ?, ?)",
                    [
                        (
                            workflow.name,
                            stage.name,
                            rid,
                            collection_id,
                            stage.max_attempts,
                            now,
                            now,
                        )
                        for rid in accepted
                    ],
                )
            return outcomes

    @_in_thread
    def get_run(self, run_id: str) -> StoredRun:
        """Return one run.

        Raises:
            NotFound: no such run.
        """
        row = self._db.execute(
            "SELECT id, collection_id, ingested_at, data, seq FROM agent_runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no agent run with id {run_id!r}")
        return StoredRun(*row)

    @_in_thread
    def list_runs(
        self, collection_id: str, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> tuple[list[StoredRun], bool]:
        """Up to `limit` runs of a collection with seq > `after_seq`, in ingestion order, and
        whether more follow. The page stops before the run that would take its encoded size over
        `max_bytes` (the first run goes regardless); only the runs returned are read whole."""
        db = self._db
        sizes = db.execute(
            "SELECT seq, size_bytes FROM agent_runs WHERE collection_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (collection_id, after_seq, limit + 1),
        ).fetchall()
        kept, more = _within([size for _, size in sizes], limit, max_bytes)
        if not kept:
            return [], False
        rows = db.execute(
            "SELECT id, collection_id, ingested_at, data, seq FROM agent_runs "
            "WHERE collection_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
            (collection_id, after_seq, sizes[kept - 1][0]),
        ).fetchall()
        return [StoredRun(*r) for r in rows], more

    @_in_thread
    def count_runs(self, collection_id: str) -> int:
        """Count the runs of a collection."""
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM agent_runs WHERE collection_id = ?", (collection_id,)
        ).fetchone()
        return int(count)

    # --- workflows ------------------------------------------------------------------------------

    def _workflow(self, db: sqlite3.Connection, name: str) -> WorkflowDef:
        # The version alone tells whether the cached definition is current (another process
        # may have applied a new one); the definition is read only when it is not.
        row = db.execute("SELECT version FROM workflows WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no workflow named {name!r}")
        cached = self._workflows.get(name)
        if cached is None or cached.version != row[0]:
            version, definition, updated_at = db.execute(
                "SELECT version, definition, updated_at FROM workflows WHERE name = ?", (name,)
            ).fetchone()
            cached = WorkflowDef.from_json(name, definition, version, updated_at)
            self._workflows[name] = cached
        return cached

    @_in_thread
    def put_workflow(self, workflow: WorkflowDef, now: float) -> tuple[WorkflowDef, bool]:
        """Store a definition (validated by the caller); a new version only if it changed.

        Raises:
            FailedPrecondition: the new definition drops a stage that holds ready or leased tasks.
        """
        definition = workflow.to_json()
        with self._transaction() as db:
            row = db.execute(
                "SELECT version, definition FROM workflows WHERE name = ?", (workflow.name,)
            ).fetchone()
            if row is not None and row[1] == definition:
                return self._workflow(db, workflow.name), False
            kept = [s.name for s in workflow.stages]
            active = db.execute(
                "SELECT stage, COUNT(*) FROM tasks WHERE workflow = ? AND state IN "
                f"('ready', 'leased') AND stage NOT IN ({','.join('?' * len(kept))}) "
                "GROUP BY stage",
                (workflow.name, *kept),
            ).fetchall()
            if active:
                held = ", ".join(f"{stage!r} ({n})" for stage, n in active)
                raise FailedPrecondition(
                    f"workflow {workflow.name!r}: the new definition drops stages that still hold "
                    f"ready or leased tasks: {held}"
                )
            version = 1 if row is None else row[0] + 1
            db.execute(
                "INSERT INTO workflows (name, version, definition, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
                "definition = excluded.definition, updated_at = excluded.updated_at",
                (workflow.name, version, definition, now),
            )
            return self._workflow(db, workflow.name), True

    @_in_thread
    def get_workflow(self, name: str) -> WorkflowDef:
        """Return a workflow.

        Raises:
            NotFound: no such workflow.
        """
        return self._workflow(self._db, name)

    @_in_thread
    def list_workflows(self) -> list[WorkflowDef]:
        """Return all workflows by name."""
        names = [r[0] for r in self._db.execute("SELECT name FROM workflows ORDER BY name")]
        return [self._workflow(self._db, n) for n in names]

    # --- tasks: enqueue and claim ---------------------------------------------------------------

    @_in_thread
    def enqueue(
        self, workflow_name: str, stage_name: str, run_ids: Sequence[str], priority: int, now: float
    ) -> tuple[int, int]:
        """Create tasks for stored runs; skip runs with a ready or leased task in the workflow.

        Returns:
            (enqueued, skipped).

        Raises:
            NotFound: unknown workflow, stage or run.
        """
        with self._transaction() as db:
            workflow = self._workflow(db, workflow_name)
            stage = workflow.stage(stage_name) if stage_name else workflow.first_stage
            enqueued = skipped = 0
            for run_id in dict.fromkeys(run_ids):
                row = db.execute(
                    "SELECT collection_id FROM agent_runs WHERE id = ?", (run_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no agent run with id {run_id!r}")
                busy = db.execute(
                    "SELECT 1 FROM tasks WHERE agent_run_id = ? AND workflow = ? "
                    "AND state IN ('ready', 'leased') LIMIT 1",
                    (run_id, workflow.name),
                ).fetchone()
                if busy:
                    skipped += 1
                    continue
                db.execute(
                    "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
                    "priority, max_attempts, created_at, ready_at) "
                    "VALUES (?, ?, ?, ?, 'ready', ?, ?, ?, ?)",
                    (
                        workflow.name,
                        stage.name,
                        run_id,
                        row[0],
                        priority,
                        stage.max_attempts,
                        now,
                        now,
                    ),
                )
                enqueued += 1
            return enqueued, skipped

    @_hot_path(lambda request, now: request.limit)
    def claim(self, request: ClaimRequest, now: float) -> list[LeasedTask]:
        """Lease up to `request.limit` ready tasks of its stages (each within its own limit),
        highest priority first, FIFO within a priority; a stage's lease duration unless the
        request sets one."""
        with self._transaction() as db:
            return self._claim(db, request, now)

    def _claim(self, db: sqlite3.Connection, request: ClaimRequest, now: float) -> list[LeasedTask]:
        stages = [s for s, n in request.stage_limits.items() if n > 0]
        if request.limit <= 0 or not stages:
            return []
        workflow = self._workflow(db, request.workflow)
        # Each stage's first ready tasks in dispatch order, read off its own range of the
        # tasks_ready index (a query over several stages at once would sort them all), then
        # merged: the best `limit` overall, within each stage's own limit, and `max_bytes`.
        per_stage = (
            "SELECT * FROM (SELECT priority, ready_at, id, stage, coalesce(length(input), 0) + "
            "(SELECT size_bytes FROM agent_runs r WHERE r.id = tasks.agent_run_id) FROM tasks "
            "WHERE state = 'ready' AND workflow = ? AND stage = ? AND ready_at <= ? "
            "ORDER BY priority DESC, ready_at, id LIMIT ?)"
        )
        candidates: list[tuple[int, float, int, str, int]] = db.execute(
            " UNION ALL ".join([per_stage] * len(stages)),
            [
                value
                for stage in stages
                for value in (
                    workflow.name,
                    stage,
                    now,
                    min(request.limit, request.stage_limits[stage]),
                )
            ],
        ).fetchall()
        if not candidates:
            return []
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        chosen = candidates[: request.limit]
        kept, _ = _within([c[4] for c in chosen], len(chosen), request.max_bytes)
        del chosen[kept:]
        seconds = {
            stage: request.lease_seconds or workflow.stage(stage).lease_seconds for stage in stages
        }
        leased: list[tuple[Any, ...]] = []
        for start in range(0, len(chosen), _INSERT_ROWS):  # SQLite caps parameters per statement
            batch = chosen[start : start + _INSERT_ROWS]
            leased += db.execute(
                "WITH c (id, seconds) AS (VALUES "
                + ", ".join(["(?, ?)"] * len(batch))
                + ") UPDATE tasks SET state = 'leased', attempt = attempt + 1, "
                "lease_id = lower(hex(randomblob(12))), session_id = ?, "
                "lease_deadline = ? + c.seconds FROM c WHERE tasks.id = c.id "
                "RETURNING tasks.id, lease_id, attempt, max_attempts, lease_deadline, stage, "
                "agent_run_id, collection_id, priority, input, created_at",
                [
                    *(value for c in batch for value in (c[2], seconds[c[3]])),
                    request.session_id,
                    now,
                ],
            ).fetchall()
        data: dict[str, bytes] = dict(
            _select_in(
                db,
                "SELECT id, data FROM agent_runs WHERE id IN ({ids})",
                list({row[6] for row in leased}),
            )
        )
        leased.sort(key=lambda row: (-row[8], row[10], row[0]))
        return [LeasedTask._make((*row, data[row[6]])) for row in leased]

    @_hot_path(lambda items, request, now: len(items) + request.limit)
    def complete_and_claim(
        self, items: Sequence[Completion], request: ClaimRequest, now: float
    ) -> tuple[list[Ack], list[LeasedTask]]:
        """Complete tasks, then lease the same session's next ones, in one transaction: a worker
        that settles a batch gets the next without another round through the dispatcher.

        `request.limit` counts the credits the completions free; each completion rejected for its
        pathway keeps its lease (and credit), so it lowers the limit by one.
        """
        with self._transaction() as db:
            acks = self._complete(db, items, now)
            kept = sum(1 for ack in acks if ack.code == AckCode.INVALID_ARGUMENT)
            if kept:
                request = dataclasses.replace(request, limit=request.limit - kept)
            return acks, self._claim(db, request, now)

    # --- tasks: settle --------------------------------------------------------------------------

    _SETTLE_COLUMNS = "state, lease_id, workflow, stage, attempt, max_attempts, pathway"

    def _settle_target(
        self, db: sqlite3.Connection, task_id: int, lease_id: str
    ) -> tuple[tuple[Any, ...] | None, Ack | None]:
        """Fetch a task for settling; return an error Ack if the lease is not the current one."""
        row = db.execute(
            f"SELECT {self._SETTLE_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        return row, _stale(task_id, lease_id, row)

    @_hot_path(lambda items, now: len(items))
    def complete(self, items: Sequence[Completion], now: float) -> list[Ack]:
        """Complete tasks and create each next stage's task, all in one transaction.

        Set-based: one read of every task named, one UPDATE of all of them, one INSERT of all
        next-stage tasks. A repeated completion of the same lease with the same pathway is
        answered OK again.
        """
        with self._transaction() as db:
            return self._complete(db, items, now)

    def _complete(
        self, db: sqlite3.Connection, items: Sequence[Completion], now: float
    ) -> list[Ack]:
        acks: list[Ack | None] = []  # None: done, its Ack made once the next task's id is known
        rows: dict[int, tuple[Any, ...]] = {
            row[0]: row[1:]
            for row in _select_in(
                db,
                f"SELECT id, {self._SETTLE_COLUMNS} FROM tasks WHERE id IN ({{ids}})",
                list({item.task_id for item in items}),
            )
        }
        workflows: dict[str, WorkflowDef] = {}
        done: list[tuple[Any, ...]] = []
        follow: list[tuple[int, str, int]] = []  # (task, next stage, its max_attempts)
        for item in items:
            row = rows.get(item.task_id)
            error = _stale(item.task_id, item.lease_id, row)
            if error is not None:
                if (
                    row is not None
                    and row[:2] == ("done", item.lease_id)
                    and row[6] == item.pathway
                ):
                    error = Ack(item.task_id, item.lease_id, stage=row[3], result="repeat")
                acks.append(error)
                continue
            assert row is not None
            name = row[2]
            if name not in workflows:
                workflows[name] = self._workflow(db, name)
            try:
                target = workflows[name].stage(row[3]).next_stage(item.pathway)
            except (InvalidArgument, NotFound) as exc:
                acks.append(
                    Ack(
                        item.task_id,
                        item.lease_id,
                        AckCode.INVALID_ARGUMENT,
                        str(exc),
                        stage=row[3],
                    )
                )
                continue
            rows[item.task_id] = ("done", item.lease_id, *row[2:6], item.pathway)
            done.append((item.task_id, item.pathway, item.output))
            if target is not None:
                stage = workflows[name].stage(target)
                follow.append((item.task_id, stage.name, stage.max_attempts))
            acks.append(None)
        for start in range(0, len(done), _INSERT_ROWS):
            settled = done[start : start + _INSERT_ROWS]
            db.execute(
                "WITH d (id, pathway, output) AS (VALUES "
                + ", ".join(["(?, ?, ?)"] * len(settled))
                + ") UPDATE tasks SET state = 'done', pathway = d.pathway, output = d.output, "
                "finished_at = ?, lease_deadline = NULL, session_id = NULL "
                "FROM d WHERE tasks.id = d.id",
                [*(value for row in settled for value in row), now],
            )
        next_ids: dict[int, int] = {}
        for start in range(0, len(follow), _INSERT_ROWS):
            created = follow[start : start + _INSERT_ROWS]
            next_ids.update(
                (previous, task)
                for task, previous in db.execute(
                    "WITH n (previous, stage, max_attempts) AS (VALUES "
                    + ", ".join(["(?, ?, ?)"] * len(created))
                    + ") INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, "
                    "state, priority, max_attempts, created_at, ready_at, input, "
                    "previous_task_id) SELECT t.workflow, n.stage, t.agent_run_id, "
                    "t.collection_id, 'ready', t.priority, n.max_attempts, ?, ?, t.output, "
                    "t.id FROM n JOIN tasks t ON t.id = n.previous "
                    "RETURNING id, previous_task_id",
                    [*(value for row in created for value in row), now, now],
                )
            )
        return [
            ack
            if ack is not None
            else Ack(
                item.task_id,
                item.lease_id,
                next_task_id=next_ids.get(item.task_id),
                stage=rows[item.task_id][3],
                result="done",
            )
            for item, ack in zip(items, acks, strict=True)
        ]

    @_hot_path(lambda items, now: len(items))
    def fail(self, items: Sequence[Failure], now: float) -> list[Ack]:
        """Record failed attempts: retry with backoff while attempts remain, else dead.

        A repeated failure of the same lease is answered OK again.
        """
        acks = []
        with self._transaction() as db:
            for item in items:
                row, error = self._settle_target(db, item.task_id, item.lease_id)
                if error is not None:
                    repeat = db.execute(
                        "SELECT 1 FROM task_failures WHERE task_id = ? AND lease_id = ?",
                        (item.task_id, item.lease_id),
                    ).fetchone()
                    if repeat:
                        error = Ack(item.task_id, item.lease_id, stage=error.stage, result="repeat")
                    acks.append(error)
                    continue
                assert row is not None
                attempt, max_attempts = row[4], row[5]
                self._record_failure(db, item.task_id, attempt, item.lease_id, item.error, now)
                if item.non_retryable or attempt >= max_attempts:
                    self._set_dead(db, item.task_id, now)
                    result = "dead"
                else:
                    delay = item.retry_after_seconds
                    if delay is None:
                        stage = self._workflow(db, row[2]).stage(row[3])
                        delay = backoff_seconds(
                            attempt, stage.initial_backoff_seconds, stage.max_backoff_seconds
                        )
                    db.execute(
                        "UPDATE tasks SET state = 'ready', ready_at = ?, lease_id = NULL, "
                        "lease_deadline = NULL, session_id = NULL WHERE id = ?",
                        (now + delay, item.task_id),
                    )
                    result = "retry"
                acks.append(Ack(item.task_id, item.lease_id, stage=row[3], result=result))
        return acks

    @staticmethod
    def _record_failure(
        db: sqlite3.Connection,
        task_id: int,
        attempt: int,
        lease_id: str | None,
        error: str,
        now: float,
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO task_failures (task_id, attempt, lease_id, error, failed_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (task_id, attempt, lease_id, error, now),
        )

    @staticmethod
    def _set_dead(db: sqlite3.Connection, task_id: int, now: float) -> None:
        db.execute(
            "UPDATE tasks SET state = 'dead', finished_at = ?, lease_deadline = NULL, "
            "session_id = NULL WHERE id = ?",
            (now, task_id),
        )

    @_hot_path(lambda items, now: len(items))
    def extend(self, items: Sequence[Extension], now: float) -> list[Ack]:
        """Set new lease deadlines from now."""
        acks = []
        with self._transaction() as db:
            for item in items:
                row, error = self._settle_target(db, item.task_id, item.lease_id)
                if error is not None:
                    acks.append(error)
                    continue
                assert row is not None
                seconds = item.lease_seconds
                if seconds is None:
                    seconds = self._workflow(db, row[2]).stage(row[3]).lease_seconds
                deadline = now + seconds
                db.execute(
                    "UPDATE tasks SET lease_deadline = ? WHERE id = ?", (deadline, item.task_id)
                )
                acks.append(
                    Ack(
                        item.task_id,
                        item.lease_id,
                        deadline=deadline,
                        stage=row[3],
                        result="extended",
                    )
                )
        return acks

    @_hot_path(lambda items, now: len(items))
    def release(self, items: Sequence[Release], now: float) -> list[Ack]:
        """Make unstarted leased tasks ready again at once, without costing an attempt."""
        acks = []
        with self._transaction() as db:
            for item in items:
                row, error = self._settle_target(db, item.task_id, item.lease_id)
                if error is not None:
                    acks.append(error)
                    continue
                assert row is not None
                db.execute(
                    "UPDATE tasks SET state = 'ready', attempt = attempt - 1, lease_id = NULL, "
                    "lease_deadline = NULL, session_id = NULL WHERE id = ?",
                    (item.task_id,),
                )
                acks.append(Ack(item.task_id, item.lease_id, stage=row[3], result="released"))
        return acks

    def _end_leases(
        self, db: sqlite3.Connection, where: str, args: tuple[Any, ...], why: str, now: float
    ) -> list[EndedLease]:
        """End the leases matching `where`: retry (attempt counted) or dead when exhausted."""
        rows = db.execute(
            "SELECT id, attempt, max_attempts, lease_id, session_id, workflow, stage FROM tasks "
            f"WHERE state = 'leased' AND {where}",
            args,
        ).fetchall()
        ended = []
        for task_id, attempt, max_attempts, lease_id, session_id, workflow, stage in rows:
            self._record_failure(db, task_id, attempt, lease_id, why, now)
            dead = attempt >= max_attempts
            if dead:
                self._set_dead(db, task_id, now)
            else:
                db.execute(
                    "UPDATE tasks SET state = 'ready', ready_at = ?, lease_id = NULL, "
                    "lease_deadline = NULL, session_id = NULL WHERE id = ?",
                    (now, task_id),
                )
            ended.append(EndedLease(task_id, lease_id, session_id, workflow, stage, dead))
        return ended

    @_in_thread
    def release_session(self, session_id: str, now: float) -> list[EndedLease]:
        """End every lease a closed Work session holds (the attempts count: it may have crashed)."""
        with self._transaction() as db:
            return self._end_leases(
                db, "session_id = ?", (session_id,), "worker stream closed holding the lease", now
            )

    @_in_thread
    def expire_leases(self, now: float) -> list[EndedLease]:
        """End every lease past its deadline."""
        with self._transaction() as db:
            return self._end_leases(db, "lease_deadline < ?", (now,), "lease expired", now)

    # --- tasks: reads and operations ------------------------------------------------------------

    @_in_thread
    def active_count(self, workflow: str, stages: Sequence[str]) -> int:
        """Count ready (now or scheduled) and leased tasks of the given stages."""
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM tasks WHERE workflow = ? AND state IN ('ready', 'leased') "
            f"AND stage IN ({','.join('?' * len(stages))})",
            (workflow, *stages),
        ).fetchone()
        return int(count)

    @_in_thread
    def backlog(self, workflow_name: str, now: float) -> list[StageBacklog]:
        """Task counts per stage of one workflow (all workflows when empty), in definition order."""
        db = self._db
        names = (
            [workflow_name]
            if workflow_name
            else [r[0] for r in db.execute("SELECT name FROM workflows ORDER BY name")]
        )
        result = []
        for name in names:
            workflow = self._workflow(db, name)
            counts: dict[str, dict[str, Any]] = {s.name: {} for s in workflow.stages}
            for stage, state, n, scheduled, oldest in db.execute(
                "SELECT stage, state, COUNT(*), SUM(ready_at > ?), "
                "MIN(CASE WHEN ready_at <= ? THEN ready_at END) "
                "FROM tasks WHERE workflow = ? GROUP BY stage, state",
                (now, now, name),
            ):
                c = counts.setdefault(stage, {})
                if state == "ready":
                    c["ready"] = n - (scheduled or 0)
                    c["scheduled"] = scheduled or 0
                    c["oldest_ready_age_seconds"] = max(0.0, now - oldest) if oldest else 0.0
                else:
                    c[state] = n
            result += [StageBacklog(name, stage, **c) for stage, c in counts.items()]
        return result

    _TASK_COLUMNS = (
        "id, workflow, stage, agent_run_id, collection_id, state, attempt, max_attempts, priority, "
        "created_at, ready_at, lease_deadline, pathway, output, input, previous_task_id"
    )

    def _task(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> TaskRecord:
        failures = tuple(
            AttemptFailureRecord(*r)
            for r in db.execute(
                "SELECT attempt, error, failed_at FROM task_failures WHERE task_id = ? "
                "ORDER BY attempt",
                (row[0],),
            )
        )
        fields = [*row[:5], TaskState(row[5]), *row[6:], failures]
        return TaskRecord(*fields)

    @_in_thread
    def get_task(self, task_id: int) -> TaskRecord:
        """Return one task with its failed attempts.

        Raises:
            NotFound: no such task.
        """
        row = self._db.execute(
            f"SELECT {self._TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no task with id {task_id}")
        return self._task(self._db, row)

    @_in_thread
    def list_tasks(
        self,
        workflow: str,
        stage: str,
        state: TaskState | None,
        after_id: int,
        limit: int,
        max_bytes: int | None = None,
    ) -> tuple[list[TaskRecord], bool]:
        """Up to `limit` tasks with id > `after_id`, filtered where arguments are set, and whether
        more follow. The page stops before the task whose input and output would take it over
        `max_bytes` (the first task goes regardless)."""
        where, args = ["id > ?"], [after_id]
        for column, value in (("workflow", workflow), ("stage", stage)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)  # type: ignore[arg-type]
        if state is not None:
            where.append("state = ?")
            args.append(state.value)  # type: ignore[arg-type]
        db = self._db
        sizes = db.execute(
            "SELECT id, coalesce(length(input), 0) + coalesce(length(output), 0) FROM tasks "
            f"WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        kept, more = _within([size for _, size in sizes], limit, max_bytes)
        if not kept:
            return [], False
        rows = db.execute(
            f"SELECT {self._TASK_COLUMNS} FROM tasks WHERE {' AND '.join(where)} AND id <= ? "
            "ORDER BY id",
            (*args, sizes[kept - 1][0]),
        ).fetchall()
        return [self._task(db, r) for r in rows], more

    def _select_ids(
        self,
        db: sqlite3.Connection,
        states: tuple[str, ...],
        workflow: str,
        stage: str,
        task_ids: Sequence[int],
    ) -> list[int]:
        where = [f"state IN ({','.join('?' * len(states))})"]
        args: list[Any] = list(states)
        if task_ids:
            sql = f"SELECT id FROM tasks WHERE {where[0]} AND id IN ({{ids}})"
            return [r[0] for r in _select_in(db, sql, task_ids, *args)]
        if not workflow:
            raise InvalidArgument("workflow: required when no task_ids are given")
        where.append("workflow = ?")
        args.append(workflow)
        if stage:
            where.append("stage = ?")
            args.append(stage)
        return [r[0] for r in db.execute(f"SELECT id FROM tasks WHERE {' AND '.join(where)}", args)]

    @_in_thread
    def redrive(self, workflow: str, stage: str, task_ids: Sequence[int], now: float) -> int:
        """Move dead tasks back to ready with a fresh attempt budget."""
        with self._transaction() as db:
            ids = self._select_ids(db, ("dead",), workflow, stage, task_ids)
            db.executemany(
                "UPDATE tasks SET state = 'ready', attempt = 0, ready_at = ?, finished_at = NULL, "
                "lease_id = NULL WHERE id = ?",
                [(now, i) for i in ids],
            )
            return len(ids)

    @_in_thread
    def cancel(
        self, workflow: str, stage: str, task_ids: Sequence[int], now: float
    ) -> tuple[int, list[EndedLease]]:
        """Cancel ready, leased and dead tasks; return how many, and the leases that ended."""
        with self._transaction() as db:
            ids = self._select_ids(db, ("ready", "leased", "dead"), workflow, stage, task_ids)
            leases = [
                EndedLease._make((*row, False))
                for row in _select_in(
                    db,
                    "SELECT id, lease_id, session_id, workflow, stage FROM tasks "
                    "WHERE state = 'leased' AND id IN ({ids})",
                    ids,
                )
            ]
            db.executemany(
                "UPDATE tasks SET state = 'cancelled', finished_at = ?, lease_deadline = NULL, "
                "session_id = NULL WHERE id = ?",
                [(now, i) for i in ids],
            )
            return len(ids), leases
