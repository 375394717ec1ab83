"""The storage statements in SQLite's SQL (`storage._statements.Statements`).

Nothing here awaits anything that waits: each coroutine runs its statements on the connection and
returns, so the engine runs a whole procedure in one step (`_engine.run_to_end`). The transaction
is the engine's (`BEGIN IMMEDIATE`: the write lock up front), so no statement here locks rows:
nothing else writes until the commit. Notices are no-ops: the `PollingNotifier` reads the data
version and the revocations and events tables instead.

SQLite binds at most `MAX_SQL_PARAMETERS` values a statement: lookups by id go `LOOKUP_IDS` at a
time (`select_in`), multi-row VALUES lists `INSERT_ROWS` rows at a time.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from agentrun_server.storage._rules import NOTHING_TO_ENTER, Candidate, SettleRow
from agentrun_server.storage._run_query import LISTED_RUN_COLUMNS, runs_sql
from agentrun_server.storage._statements import (
    COLLECTION_COLUMNS,
    ENDED_STATES,
    KEY_COLUMNS,
    RUN_COLUMNS,
    SETTLE_COLUMNS,
    TASK_COLUMNS,
    ActiveCounts,
    CancelledTask,
    LeaseEnd,
    LiveRunRow,
    NewLease,
    TaskFilter,
    TaskSelection,
    collection_record,
    failure_record,
    key_record,
    task_record,
)
from agentrun_server.storage._types import (
    ApiKeyRecord,
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
    TraceState,
    WorkflowDef,
)

MAX_SQL_PARAMETERS = 32_766
LOOKUP_IDS = 1000
"""Ids per `IN (...)` lookup, far under MAX_SQL_PARAMETERS."""
INSERT_ROWS = 1000
"""Rows per multi-row VALUES list, far under MAX_SQL_PARAMETERS."""
RUN_ROWS = 100
RUN_BYTES = 4 * 1024 * 1024
"""A multi-row INSERT of runs holds at most RUN_ROWS runs and this many bytes (and at least one
run): SQLite copies every value it binds, so 1,000 rows of large runs held one statement's worth
more memory at once (the server's peak RSS rose by half)."""
MAX_LANDED_RUNS = 10_000
"""Runs one look at new events names at most; past it, every watcher is woken (None)."""

CountKey = tuple[str, str, str]
"""(workflow, stage, state) of the kept count of ended tasks."""


def select_in(
    db: sqlite3.Connection, sql: str, ids: Sequence[Any], *args: Any
) -> list[tuple[Any, ...]]:
    """The rows of `sql`, whose `{ids}` is an `IN` list, run over LOOKUP_IDS of `ids` at a time;
    `args` bind before the ids. A list, fetched a slice at a time: a generator's resumption per
    row cost more than the rows on the hot path."""
    if len(ids) <= LOOKUP_IDS:
        return db.execute(sql.format(ids=",".join("?" * len(ids))), [*args, *ids]).fetchall()
    rows = []
    for start in range(0, len(ids), LOOKUP_IDS):
        lookup = list(ids[start : start + LOOKUP_IDS])
        rows += db.execute(sql.format(ids=",".join("?" * len(lookup))), [*args, *lookup]).fetchall()
    return rows


def _values(columns: int, rows: int) -> str:
    """A multi-row VALUES list of `rows` rows of `columns` placeholders."""
    row = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([row] * rows)


def _run_batches(runs: Sequence[NewRun]) -> Iterator[Sequence[NewRun]]:
    """`runs` in slices for one INSERT each: at most RUN_ROWS runs and RUN_BYTES."""
    batch: list[NewRun] = []
    size = 0
    for run in runs:
        if batch and (len(batch) == RUN_ROWS or size + len(run.data) > RUN_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(run)
        size += len(run.data)
    if batch:
        yield batch


def _taking(args: list[Any]) -> Callable[[Any], str]:
    """A `runs_sql` parameter taker: appends each value to `args`, placeholder `?`."""

    def take(value: Any) -> str:
        args.append(value)
        return "?"

    return take


def _task_where(where: TaskFilter, after_id: int) -> tuple[str, list[Any]]:
    conditions = ["id > ?"]
    args: list[Any] = [after_id]
    for column, value in (
        ("workflow", where.workflow),
        ("stage", where.stage),
        ("agent_run_id", where.agent_run_id),
    ):
        if value:
            conditions.append(f"{column} = ?")
            args.append(value)
    if where.state is not None:
        conditions.append("state = ?")
        args.append(where.state.value)
    return " AND ".join(conditions), args


def _collection_runs(selection: RunSelection) -> tuple[str, list[Any]]:
    """The WHERE clause (agent_runs as `r`) of a collection's runs a deletion names, and its
    parameters."""
    if selection.ingested_before is None:
        return "r.collection_id = ?", [selection.collection_id]
    return "r.collection_id = ? AND r.ingested_at < ?", [
        selection.collection_id,
        selection.ingested_before,
    ]


class SqliteStatements:
    """The statements of one transaction on one SQLite connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def _counts(self, deltas: Counter[CountKey]) -> None:
        """Add to the kept counts of ended tasks."""
        changed = [(*key, n) for key, n in deltas.items() if n]
        if changed:
            self._db.executemany(
                "INSERT INTO task_counts (workflow, stage, state, count) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET count = count + excluded.count",
                changed,
            )

    # --- collections and runs -------------------------------------------------------------------

    async def insert_collection(
        self, id: str, name: str, description: str, workflow: str, abandon: bool, now: float
    ) -> float | None:
        created = self._db.execute(
            "INSERT INTO collections (id, name, description, workflow, created_at, "
            "enter_on_abandon) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING RETURNING id",
            (id, name, description, workflow, now, abandon),
        ).fetchone()
        return None if created is None else now

    async def collection(self, column: str, key: str) -> Collection | None:
        row = self._db.execute(
            f"SELECT {COLLECTION_COLUMNS} FROM collections WHERE {column} = ?", (key,)
        ).fetchone()
        return None if row is None else collection_record(row)

    async def collections(self) -> list[Collection]:
        rows = self._db.execute(
            f"SELECT {COLLECTION_COLUMNS} FROM collections ORDER BY created_at, id"
        ).fetchall()
        return [collection_record(row) for row in rows]

    async def collection_workflow(self, collection_id: str) -> str | None:
        row = self._db.execute(
            "SELECT workflow FROM collections WHERE id = ?", (collection_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    async def add_run_count(self, collection_id: str, runs: int) -> None:
        self._db.execute(
            "UPDATE collections SET run_count = run_count + ? WHERE id = ?", (runs, collection_id)
        )

    async def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> dict[str, int]:
        accepted: dict[str, int] = {}
        for batch in _run_batches(runs):
            values: list[Any] = []
            for run in batch:
                values += (run.id, collection_id, run.name, len(run.data), now, run.data)
            # No RETURNING: its rows come back a step each, each step releasing and retaking the
            # GIL (with the facets below, uploads 5-13 % slower, measured). A new row's seq is
            # one past the largest (SQLite's rowid rule), in VALUES order.
            (top,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM agent_runs").fetchone()
            cursor = self._db.execute(
                "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, "
                f"data) VALUES {_values(6, len(batch))} ON CONFLICT (id) DO NOTHING",
                values,
            )
            if cursor.rowcount == len(batch) and cursor.lastrowid == top + len(batch):
                accepted.update(zip([run.id for run in batch], itertools.count(top + 1)))
            elif cursor.rowcount:  # some were stored already: the new rows say which went in
                accepted.update(
                    self._db.execute(
                        "SELECT id, seq FROM agent_runs WHERE seq > ?", (top,)
                    ).fetchall()
                )
        return accepted

    async def insert_facets(self, collection_id: str, rows: Sequence[tuple[int, Facet]]) -> None:
        # Multi-row VALUES, not executemany: one step per statement, not per row (see above).
        for start in range(0, len(rows), INSERT_ROWS):
            chunk = rows[start : start + INSERT_ROWS]
            values: list[Any] = []
            for seq, (key, num, text) in chunk:
                values += (seq, collection_id, key, num, text)
            self._db.execute(
                "INSERT INTO run_facets (run_seq, collection_id, key, num, text) "
                f"VALUES {_values(5, len(chunk))} ON CONFLICT DO NOTHING",
                values,
            )

    async def run_seq(self, run_id: str) -> int | None:
        row = self._db.execute("SELECT seq FROM agent_runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else int(row[0])

    async def facet_backfill(self) -> tuple[int, int]:
        row = self._db.execute("SELECT done, through FROM run_facets_backfill").fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def runs_between(self, after_seq: int, through: int, limit: int) -> list[StoredRun]:
        rows = self._db.execute(
            f"SELECT {RUN_COLUMNS} FROM agent_runs WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (after_seq, through, limit),
        ).fetchall()
        return [StoredRun(*row) for row in rows]

    async def advance_facet_backfill(self, done: int, to: int) -> bool:
        moved = self._db.execute(
            "UPDATE run_facets_backfill SET done = ? WHERE done = ?", (to, done)
        ).rowcount
        return bool(moved)

    async def run_collections(self, run_ids: Sequence[str]) -> dict[str, str]:
        return dict(
            select_in(
                self._db, "SELECT id, collection_id FROM agent_runs WHERE id IN ({ids})", run_ids
            )
        )

    async def run(self, run_id: str) -> StoredRun | None:
        row = self._db.execute(
            f"SELECT {RUN_COLUMNS} FROM agent_runs WHERE id = ?", (run_id,)
        ).fetchone()
        return None if row is None else StoredRun(*row)

    async def run_size(self, run_id: str) -> tuple[str, int] | None:
        row = self._db.execute(
            "SELECT collection_id, size_bytes FROM agent_runs WHERE id = ?", (run_id,)
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    async def run_sizes(self, query: RunQuery, after_seq: int, limit: int) -> list[tuple[int, int]]:
        args: list[Any] = []
        sql = runs_sql(query, "r.seq, r.size_bytes", after_seq, None, limit, _taking(args))
        return self._db.execute(sql, args).fetchall()

    async def runs_through(self, query: RunQuery, after_seq: int, last_seq: int) -> list[StoredRun]:
        args: list[Any] = []
        sql = runs_sql(query, LISTED_RUN_COLUMNS, after_seq, last_seq, None, _taking(args))
        return [StoredRun(*row) for row in self._db.execute(sql, args).fetchall()]

    async def run_count(self, collection_id: str) -> int:
        row = self._db.execute(
            "SELECT run_count FROM collections WHERE id = ?", (collection_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    # --- OpenTelemetry traces -------------------------------------------------------------------

    async def open_trace(self, run_id: str, now: float) -> None:
        self._db.execute(
            "INSERT INTO otlp_traces (run_id, last_span_at) VALUES (?, ?) "
            "ON CONFLICT (run_id) DO NOTHING",
            (run_id, now),
        )

    async def trace(self, run_id: str) -> TraceState | None:
        row = self._db.execute(
            "SELECT state, root_ended, finished FROM otlp_traces WHERE run_id = ?", (run_id,)
        ).fetchone()
        return None if row is None else TraceState(row[0], bool(row[1]), bool(row[2]))

    async def stored_spans(self, run_id: str, span_ids: Sequence[str]) -> set[str]:
        rows = select_in(
            self._db,
            "SELECT span_id FROM otlp_spans WHERE run_id = ? AND span_id IN ({ids})",
            span_ids,
            run_id,
        )
        return {row[0] for row in rows}

    async def insert_spans(self, run_id: str, spans: Sequence[NewSpan]) -> None:
        self._db.executemany(
            "INSERT INTO otlp_spans (run_id, span_id, start_ns, data) VALUES (?, ?, ?, ?)",
            [(run_id, span.span_id, span.start_ns, span.data) for span in spans],
        )

    async def update_trace(self, run_id: str, state: bytes, root_ended: bool, now: float) -> None:
        self._db.execute(
            "UPDATE otlp_traces SET state = ?, root_ended = root_ended OR ?, last_span_at = ? "
            "WHERE run_id = ?",
            (state, root_ended, now, run_id),
        )

    async def traces_to_finish(self, quiet_before: float, limit: int) -> list[str]:
        rows = self._db.execute(
            "SELECT run_id FROM otlp_traces WHERE root_ended = 1 AND finished = 0 "
            "AND last_span_at < ? ORDER BY last_span_at LIMIT ?",
            (quiet_before, limit),
        ).fetchall()
        return [row[0] for row in rows]

    async def trace_spans(self, run_id: str) -> list[bytes]:
        rows = self._db.execute(
            "SELECT data FROM otlp_spans WHERE run_id = ? ORDER BY start_ns, span_id", (run_id,)
        )
        return [row[0] for row in rows]

    async def finish_trace(self, run_id: str) -> None:
        self._db.execute("UPDATE otlp_traces SET finished = 1 WHERE run_id = ?", (run_id,))

    # --- deletion -------------------------------------------------------------------------------

    async def update_collection(
        self, collection_id: str, description: str | None, retention_days: int | None
    ) -> bool:
        changes = {"description": description, "retention_days": retention_days}
        given = {column: value for column, value in changes.items() if value is not None}
        sets = ", ".join(f"{column} = ?" for column in given) or "id = id"
        moved = self._db.execute(
            f"UPDATE collections SET {sets} WHERE id = ?", (*given.values(), collection_id)
        ).rowcount
        return bool(moved)

    async def retained_collections(self) -> list[tuple[str, int]]:
        return self._db.execute(
            "SELECT id, retention_days FROM collections WHERE retention_days > 0"
        ).fetchall()

    async def runs_to_delete(
        self, selection: RunSelection, limit: int, skip_leased: bool
    ) -> list[DoomedRun]:
        free = (
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.agent_run_id = r.id "
            "AND t.state = 'leased')"
            if skip_leased
            else ""
        )
        if selection.run_ids:
            rows = select_in(
                self._db,
                f"SELECT seq, id, collection_id FROM agent_runs r WHERE id IN ({{ids}}){free}",
                selection.run_ids,
            )
            return [DoomedRun._make(row) for row in sorted(rows)[:limit]]
        where, args = _collection_runs(selection)
        rows = self._db.execute(
            f"SELECT seq, id, collection_id FROM agent_runs r WHERE {where}{free} "
            "ORDER BY seq LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [DoomedRun._make(row) for row in rows]

    async def leased_tasks(self, selection: RunSelection) -> list[LeasedTaskOfRun]:
        columns = "t.id, t.agent_run_id, t.workflow, t.stage"
        if selection.run_ids:
            rows = select_in(
                self._db,
                f"SELECT {columns} FROM tasks t WHERE t.state = 'leased' "
                "AND t.agent_run_id IN ({ids})",
                selection.run_ids,
            )
        else:
            where, args = _collection_runs(selection)
            rows = self._db.execute(
                f"SELECT {columns} FROM tasks t JOIN agent_runs r ON r.id = t.agent_run_id "
                f"WHERE t.state = 'leased' AND {where}",
                args,
            ).fetchall()
        return [LeasedTaskOfRun._make(row) for row in rows]

    async def delete_runs(self, runs: Sequence[DoomedRun]) -> int:
        ids = [run.id for run in runs]
        tasks = select_in(
            self._db,
            "DELETE FROM tasks WHERE agent_run_id IN ({ids}) RETURNING id, workflow, stage, state",
            ids,
        )
        ended: Counter[CountKey] = Counter()
        for _, workflow, stage, state in tasks:
            if state in ENDED_STATES:
                ended[(workflow, stage, state)] -= 1
        self._counts(ended)
        select_in(
            self._db, "DELETE FROM task_failures WHERE task_id IN ({ids})", [t[0] for t in tasks]
        )
        select_in(self._db, "DELETE FROM agent_run_events WHERE agent_run_id IN ({ids})", ids)
        select_in(self._db, "DELETE FROM otlp_spans WHERE run_id IN ({ids})", ids)
        select_in(self._db, "DELETE FROM otlp_traces WHERE run_id IN ({ids})", ids)
        select_in(self._db, "DELETE FROM agent_runs WHERE seq IN ({ids})", [r.seq for r in runs])
        self._db.executemany(
            "UPDATE collections SET run_count = run_count - ? WHERE id = ?",
            [(n, c) for c, n in Counter(run.collection_id for run in runs).items()],
        )
        return len(tasks)

    async def delete_collection(self, collection_id: str) -> bool:
        moved = self._db.execute(
            "DELETE FROM collections WHERE id = ? AND NOT EXISTS "
            "(SELECT 1 FROM agent_runs WHERE collection_id = ?)",
            (collection_id, collection_id),
        ).rowcount
        return bool(moved)

    # --- live runs ------------------------------------------------------------------------------

    async def live_run(self, run_id: str) -> LiveRunRow | None:
        row = self._db.execute(
            "SELECT collection_id, state, next_sequence, size_bytes, entered_at FROM agent_runs "
            "WHERE id = ?",
            (run_id,),
        ).fetchone()
        return None if row is None else LiveRunRow._make(row)

    async def stored_event(self, run_id: str, sequence: int) -> tuple[bytes | None, bytes] | None:
        return self._db.execute(  # type: ignore[no-any-return]
            "SELECT digest, data FROM agent_run_events WHERE agent_run_id = ? AND sequence = ?",
            (run_id, sequence),
        ).fetchone()

    async def event_patches(self, run_id: str) -> list[bytes]:
        rows = self._db.execute(
            "SELECT data FROM agent_run_events WHERE agent_run_id = ? ORDER BY sequence", (run_id,)
        )
        return [row[0] for row in rows]

    async def open_live_run(self, event: NewEvent, now: float) -> bool:
        created = self._db.execute(
            "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data, "
            "state, next_sequence, updated_at) VALUES (?, ?, NULL, ?, ?, x'', 'running', 2, ?) "
            "ON CONFLICT (id) DO NOTHING RETURNING id",
            (event.run_id, event.collection_id, len(event.patch), now, now),
        ).fetchone()
        return created is not None

    async def advance_live_run(self, run_id: str, expected: int, size: int, now: float) -> None:
        self._db.execute(
            "UPDATE agent_runs SET next_sequence = ?, size_bytes = ?, updated_at = ?, "
            "state = 'running' WHERE id = ? AND next_sequence = ?",
            (expected + 1, size, now, run_id, expected),
        )

    async def insert_event(self, event: NewEvent, now: float) -> None:
        self._db.execute(
            "INSERT INTO agent_run_events (agent_run_id, sequence, created_at, data, digest) "
            "VALUES (?, ?, ?, ?, ?)",
            (event.run_id, event.sequence, now, event.patch, event.digest or None),
        )

    async def finish_run(
        self, run_id: str, data: bytes, name: str | None, enters: bool, now: float
    ) -> None:
        self._db.execute(
            "UPDATE agent_runs SET state = 'finished', data = ?, name = ?, size_bytes = ?, "
            "updated_at = ?, entered_at = CASE WHEN ? THEN ? ELSE entered_at END WHERE id = ?",
            (data, name, len(data), now, enters, now, run_id),
        )

    async def abandoned_to_enter(self, before: float, limit: int) -> list[tuple[str, str]]:
        # Read off the partial index agent_runs_to_enter.
        return self._db.execute(
            "SELECT r.id, r.collection_id FROM agent_runs r "
            "JOIN collections c ON c.id = r.collection_id "
            "WHERE r.state = 'running' AND r.entered_at IS NULL AND r.updated_at < ? "
            "AND c.enter_on_abandon AND c.workflow != '' ORDER BY r.updated_at LIMIT ?",
            (before, limit),
        ).fetchall()

    async def enter_abandoned_run(
        self, run_id: str, data: bytes | None, name: str | None, now: float
    ) -> None:
        if data is None:
            self._db.execute(
                "UPDATE agent_runs SET entered_at = ? WHERE id = ?", (NOTHING_TO_ENTER, run_id)
            )
        else:
            self._db.execute(
                "UPDATE agent_runs SET data = ?, name = ?, entered_at = ? WHERE id = ?",
                (data, name, now, run_id),
            )

    async def run_header(self, run_id: str) -> StoredRun | None:
        row = self._db.execute(
            "SELECT id, collection_id, ingested_at, x'', seq, state, updated_at, next_sequence "
            "FROM agent_runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        return None if row is None else StoredRun(*row)

    async def events_after(self, run_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = self._db.execute(
            "SELECT sequence, data FROM agent_run_events WHERE agent_run_id = ? AND sequence > ? "
            "ORDER BY sequence LIMIT ?",
            (run_id, after, limit),
        ).fetchall()
        return [(int(sequence), bytes(data)) for sequence, data in rows]

    async def event_sizes(self, run_id: str, after: int, limit: int) -> list[int]:
        # length() of a blob reads its record header, not its pages.
        rows = self._db.execute(
            "SELECT length(data) FROM agent_run_events WHERE agent_run_id = ? AND sequence > ? "
            "ORDER BY sequence LIMIT ?",
            (run_id, after, limit),
        ).fetchall()
        return [int(size) for (size,) in rows]

    async def live_run_counts(self, before: float) -> list[tuple[str, int, int]]:
        # Read off the partial index of running runs.
        rows = self._db.execute(
            "SELECT collection_id, count(*) FILTER (WHERE updated_at >= ?), "
            "count(*) FILTER (WHERE updated_at < ?) "
            # GROUP BY alone leads SQLite to walk every run in collection order.
            "FROM agent_runs INDEXED BY agent_runs_live WHERE state = 'running' "
            "GROUP BY collection_id",
            (before, before),
        ).fetchall()
        return [(str(c), int(running), int(abandoned)) for c, running, abandoned in rows]

    async def notify_events(self, run_ids: Sequence[str]) -> None:
        pass

    def events_landed_after(self, after_id: int) -> tuple[int, list[str] | None]:
        """The newest event's row id, and the runs whose events have row ids after `after_id`
        (None: more than MAX_LANDED_RUNS, wake every watcher); -1: just the id to start from.
        What the `PollingNotifier` reads instead of a notice."""
        if after_id < 0:
            row = self._db.execute(
                "SELECT coalesce(max(rowid), 0) FROM agent_run_events"
            ).fetchone()
            return int(row[0]), []
        rows = self._db.execute(
            "SELECT agent_run_id, max(rowid) FROM agent_run_events WHERE rowid > ? "
            "GROUP BY agent_run_id LIMIT ?",
            (after_id, MAX_LANDED_RUNS + 1),
        ).fetchall()
        if not rows:
            return after_id, []
        if len(rows) > MAX_LANDED_RUNS:
            row = self._db.execute(
                "SELECT coalesce(max(rowid), 0) FROM agent_run_events"
            ).fetchone()
            return int(row[0]), None
        return max(int(r[1]) for r in rows), [r[0] for r in rows]

    def data_version(self) -> int:
        """Changes whenever another connection (of this process or another) commits."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # --- workflows ------------------------------------------------------------------------------

    async def workflow_version(self, name: str) -> int | None:
        row = self._db.execute("SELECT version FROM workflows WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    async def workflow(self, name: str) -> WorkflowDef | None:
        row = self._db.execute(
            "SELECT version, definition, updated_at FROM workflows WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else WorkflowDef.from_json(name, row[1], row[0], row[2])

    async def workflow_to_change(self, name: str) -> tuple[int, str] | None:
        return self._db.execute(  # type: ignore[no-any-return]
            "SELECT version, definition FROM workflows WHERE name = ?", (name,)
        ).fetchone()

    async def stages_holding_tasks(
        self, workflow: str, outside: Sequence[str]
    ) -> list[tuple[str, int]]:
        return self._db.execute(
            "SELECT stage, count(*) FROM tasks WHERE workflow = ? AND state IN "
            f"('ready', 'leased') AND stage NOT IN ({','.join('?' * len(outside))}) "
            "GROUP BY stage ORDER BY stage",
            (workflow, *outside),
        ).fetchall()

    async def store_workflow(self, name: str, version: int, definition: str, now: float) -> bool:
        stored = self._db.execute(
            "INSERT INTO workflows (name, version, definition, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
            "definition = excluded.definition, updated_at = excluded.updated_at "
            "WHERE workflows.version = ? RETURNING version",
            (name, version, definition, now, version - 1),
        ).fetchone()
        return stored is not None

    async def workflow_names(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT name FROM workflows ORDER BY name")]

    async def counted_stages(self, workflow: str) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT stage FROM task_counts WHERE workflow = ?", (workflow,)
        )
        return [row[0] for row in rows]

    # --- tasks: enter, claim, settle ------------------------------------------------------------

    async def enter_tasks(
        self,
        workflow: str,
        stage: StageDef,
        runs: Sequence[tuple[str, str]],
        priority: int,
        now: float,
    ) -> int:
        # The unique index on a run's ready or leased task in a workflow skips (DO NOTHING).
        # Counted by the connection's changes, not RETURNING (a row built and fetched per task;
        # no triggers write beside these rows).
        db = self._db
        before = db.total_changes
        for start in range(0, len(runs), INSERT_ROWS):
            batch = runs[start : start + INSERT_ROWS]
            db.execute(
                f"WITH r (id, collection_id) AS (VALUES {_values(2, len(batch))}) "
                "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
                "priority, max_attempts, created_at, ready_at) SELECT ?, ?, r.id, "
                "r.collection_id, 'ready', ?, ?, ?, ? FROM r WHERE true ON CONFLICT DO NOTHING",
                [
                    *(value for run in batch for value in run),
                    workflow,
                    stage.name,
                    priority,
                    stage.max_attempts,
                    now,
                    now,
                ],
            )
        return db.total_changes - before

    async def claim_candidates(
        self, workflow: str, limits: Mapping[str, int], now: float
    ) -> list[Candidate]:
        # Each stage's first ready tasks off its own range of the tasks_ready index (a query over
        # several stages at once would sort them all), then merged.
        per_stage = (
            "SELECT * FROM (SELECT priority, ready_at, id, stage, coalesce(length(input), 0) + "
            "(SELECT size_bytes FROM agent_runs r WHERE r.id = tasks.agent_run_id) FROM tasks "
            "WHERE state = 'ready' AND workflow = ? AND stage = ? AND ready_at <= ? "
            "ORDER BY priority DESC, ready_at, id LIMIT ?)"
        )
        rows = self._db.execute(
            " UNION ALL ".join([per_stage] * len(limits)),
            [value for stage, n in limits.items() for value in (workflow, stage, now, n)],
        ).fetchall()
        return [Candidate._make(row) for row in rows]

    async def lease_tasks(
        self, leases: Sequence[NewLease], holder: LeaseHolder, server_id: str, now: float
    ) -> list[LeasedTask]:
        held_by = holder.encode()
        leased: list[tuple[Any, ...]] = []
        for start in range(0, len(leases), INSERT_ROWS):
            batch = leases[start : start + INSERT_ROWS]
            leased += self._db.execute(
                f"WITH c (id, lease_id, seconds) AS (VALUES {_values(3, len(batch))}) "
                "UPDATE tasks SET state = 'leased', attempt = attempt + 1, lease_id = c.lease_id, "
                "session_id = ?, holder = ?, server_id = ?, detached_at = NULL, "
                "lease_deadline = ? + c.seconds FROM c "
                "WHERE tasks.id = c.id AND tasks.state = 'ready' AND tasks.ready_at <= ? "
                "RETURNING tasks.id, tasks.lease_id, attempt, max_attempts, lease_deadline, stage, "
                "agent_run_id, collection_id, priority, input, created_at",
                [
                    *(v for lease in batch for v in lease),
                    holder.session_id,
                    held_by,
                    server_id or None,
                    now,
                    now,
                ],
            ).fetchall()
        data: dict[str, bytes] = dict(
            select_in(
                self._db,
                "SELECT id, data FROM agent_runs WHERE id IN ({ids})",
                list({row[6] for row in leased}),
            )
        )
        return [LeasedTask._make((*row, data[row[6]])) for row in leased]

    async def settle_rows(self, task_ids: Sequence[int]) -> dict[int, SettleRow]:
        return {
            row[0]: SettleRow._make(row)
            for row in select_in(
                self._db,
                f"SELECT {SETTLE_COLUMNS}, NULL, session_id FROM tasks WHERE id IN ({{ids}})",
                list(set(task_ids)),
            )
        }

    async def successors(self, task_ids: Sequence[int]) -> dict[int, int]:
        return dict(
            select_in(
                self._db,
                "SELECT previous_task_id, id FROM tasks WHERE previous_task_id IN ({ids})",
                list(set(task_ids)),
            )
        )

    async def settle_row(self, task_id: int, lease_id: str) -> SettleRow | None:
        row = self._db.execute(
            f"SELECT {SETTLE_COLUMNS}, (SELECT error FROM task_failures f "
            "WHERE f.task_id = tasks.id AND f.lease_id = ? LIMIT 1), session_id FROM tasks "
            "WHERE id = ?",
            (lease_id, task_id),
        ).fetchone()
        return None if row is None else SettleRow._make(row)

    async def complete_tasks(
        self,
        done: Sequence[Completion],
        rows: Mapping[int, SettleRow],
        follow: Mapping[int, StageDef],
        now: float,
    ) -> dict[int, int | None]:
        db = self._db
        moved: set[int] = set()
        for start in range(0, len(done), INSERT_ROWS):
            batch = done[start : start + INSERT_ROWS]
            # No RETURNING: it costs a tenth of this statement in SQLite. The count of rows
            # changed says whether every one moved; only a shortfall is looked up (never, in one
            # process). (rowcount: Python's sqlite3 sees no DML in a WITH.)
            before = db.total_changes
            db.execute(
                f"WITH d (id, lease_id, pathway, output) AS (VALUES {_values(4, len(batch))}) "
                "UPDATE tasks SET state = 'done', pathway = d.pathway, output = d.output, "
                "finished_at = ?, lease_deadline = NULL, session_id = NULL, server_id = NULL, "
                "detached_at = NULL FROM d "
                "WHERE tasks.id = d.id AND tasks.state = 'leased' AND tasks.lease_id = d.lease_id",
                [*(value for c in batch for value in c), now],
            )
            if db.total_changes - before == len(batch):
                moved.update(c.task_id for c in batch)
            else:
                after = await self.settle_rows([c.task_id for c in batch])
                moved.update(
                    c.task_id
                    for c in batch
                    if (row := after.get(c.task_id)) is not None
                    and (row.state, row.lease_id, row.pathway) == ("done", c.lease_id, c.pathway)
                )
        result: dict[int, int | None] = dict.fromkeys(moved)
        created = [(task_id, stage) for task_id, stage in follow.items() if task_id in moved]
        for start in range(0, len(created), INSERT_ROWS):
            batch_ = created[start : start + INSERT_ROWS]
            result.update(
                (previous, task)
                for task, previous in db.execute(
                    f"WITH n (previous, stage, max_attempts) AS (VALUES {_values(3, len(batch_))}) "
                    "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
                    "priority, max_attempts, created_at, ready_at, input, previous_task_id) "
                    "SELECT t.workflow, n.stage, t.agent_run_id, t.collection_id, 'ready', "
                    "t.priority, n.max_attempts, ?, ?, t.output, t.id "
                    "FROM n JOIN tasks t ON t.id = n.previous WHERE true "
                    "ON CONFLICT DO NOTHING RETURNING id, previous_task_id",
                    [
                        *(v for task_id, s in batch_ for v in (task_id, s.name, s.max_attempts)),
                        now,
                        now,
                    ],
                )
            )
        self._counts(Counter((rows[t].workflow, rows[t].stage, "done") for t in moved))
        return result

    async def end_attempt(self, row: SettleRow, dead: bool, delay: float, now: float) -> bool:
        if dead:
            moved = self._db.execute(
                "UPDATE tasks SET state = 'dead', finished_at = ?, lease_deadline = NULL, "
                "session_id = NULL, server_id = NULL, detached_at = NULL "
                "WHERE id = ? AND state = 'leased' AND lease_id = ? RETURNING id",
                (now, row.task_id, row.lease_id),
            ).fetchone()
        else:
            moved = self._db.execute(
                "UPDATE tasks SET state = 'ready', ready_at = ?, lease_id = NULL, "
                "lease_deadline = NULL, session_id = NULL, server_id = NULL, detached_at = NULL "
                "WHERE id = ? AND state = 'leased' AND lease_id = ? RETURNING id",
                (now + delay, row.task_id, row.lease_id),
            ).fetchone()
        if moved is not None and dead:
            self._counts(Counter({(row.workflow, row.stage, "dead"): 1}))
        return moved is not None

    async def record_failure(
        self, task_id: int, attempt: int, lease_id: str | None, error: str, now: float
    ) -> None:
        self._db.execute(
            "INSERT INTO task_failures (task_id, attempt, lease_id, error, failed_at, holder) "
            "VALUES (?, ?, ?, ?, ?, (SELECT holder FROM tasks WHERE id = ?)) "
            "ON CONFLICT (task_id, attempt) DO UPDATE SET lease_id = excluded.lease_id, "
            "error = excluded.error, failed_at = excluded.failed_at, holder = excluded.holder",
            (task_id, attempt, lease_id, error, now, task_id),
        )

    async def extend_lease(
        self, task_id: int, lease_id: str, seconds: float, now: float
    ) -> float | None:
        row = self._db.execute(
            "UPDATE tasks SET lease_deadline = ? WHERE id = ? AND state = 'leased' "
            "AND lease_id = ? RETURNING lease_deadline",
            (now + seconds, task_id, lease_id),
        ).fetchone()
        return None if row is None else float(row[0])

    async def release_lease(self, item: Release, holder: str, now: float) -> tuple[str, str] | None:
        return self._db.execute(  # type: ignore[no-any-return]
            "UPDATE tasks SET state = 'ready', attempt = attempt - 1, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL, "
            "ready_at = CASE WHEN ? > 0 THEN ? ELSE ready_at END "
            "WHERE id = ? AND state = 'leased' AND lease_id = ? "
            "AND (? = '' OR session_id IS NULL OR session_id = ?) RETURNING workflow, stage",
            (
                item.delay_seconds,
                now + item.delay_seconds,
                item.task_id,
                item.lease_id,
                holder,
                holder,
            ),
        ).fetchone()

    async def notify_ready(self, workflow: str) -> None:
        pass

    # --- leases ---------------------------------------------------------------------------------

    def _leased(self, where: str, args: Sequence[Any]) -> list[SettleRow]:
        # Unordered: ORDER BY id would read the expired leases by scanning the whole table in id
        # order rather than off the lease_deadline index (the sweep went from 0.1 ms to 6 ms).
        rows = self._db.execute(
            f"SELECT {SETTLE_COLUMNS}, NULL, session_id FROM tasks "
            f"WHERE state = 'leased' AND {where}",
            args,
        ).fetchall()
        return [SettleRow._make(row) for row in rows]

    async def session_leases(self, session_id: str) -> list[SettleRow]:
        return self._leased("session_id = ?", (session_id,))

    async def expired_leases(self, now: float) -> list[SettleRow]:
        return self._leased("lease_deadline < ?", (now,))

    async def unresumed_leases(self, now: float, grace_seconds: float) -> list[SettleRow]:
        return self._leased("session_id IS NULL AND detached_at <= ?", (now - grace_seconds,))

    async def end_leases(self, ends: Sequence[LeaseEnd], why: str, now: float) -> set[int]:
        moved = set()
        for row, dead in ends:
            if await self.end_attempt(row, dead, 0.0, now):
                await self.record_failure(row.task_id, row.attempt, row.lease_id, why, now)
                moved.add(row.task_id)
        return moved

    async def detach_leases(self, session_id: str, now: float) -> int:
        return self._db.execute(
            "UPDATE tasks SET session_id = NULL, server_id = NULL, detached_at = ? "
            "WHERE state = 'leased' AND session_id = ?",
            (now, session_id),
        ).rowcount

    async def attach_lease(
        self, task_id: int, lease_id: str, holder: LeaseHolder, server_id: str
    ) -> tuple[float, str] | None:
        return self._db.execute(  # type: ignore[no-any-return]
            "UPDATE tasks SET session_id = ?, holder = ?, server_id = ?, detached_at = NULL "
            "WHERE id = ? AND state = 'leased' AND lease_id = ? RETURNING lease_deadline, stage",
            (holder.session_id, holder.encode(), server_id or None, task_id, lease_id),
        ).fetchone()

    async def record_heartbeat(self, server_id: str, host: str, pid: int, now: float) -> None:
        self._db.execute(
            "INSERT INTO servers (id, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (server_id, host, pid, now, now),
        )

    async def delete_server(self, server_id: str) -> None:
        self._db.execute("DELETE FROM servers WHERE id = ?", (server_id,))

    async def detach_silent_servers(self, now: float, grace_seconds: float) -> None:
        for server_id, heartbeat_at in self._db.execute(
            "SELECT id, heartbeat_at FROM servers WHERE heartbeat_at < ?", (now - grace_seconds,)
        ).fetchall():
            self._db.execute(
                "UPDATE tasks SET session_id = NULL, server_id = NULL, detached_at = ? "
                "WHERE state = 'leased' AND server_id = ?",
                (heartbeat_at, server_id),
            )
            self._db.execute("DELETE FROM servers WHERE id = ?", (server_id,))

    async def record_revocations(
        self, leases: Sequence[EndedLease], reason: str, now: float
    ) -> None:
        self._db.executemany(
            "INSERT INTO lease_revocations (task_id, lease_id, session_id, reason, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(e.task_id, e.lease_id, e.session_id, reason, now) for e in leases],
        )

    async def notify_revoked(self) -> None:
        pass

    async def forget_revocations(self, now: float, kept_seconds: float) -> None:
        self._db.execute(
            "DELETE FROM lease_revocations WHERE created_at < ?", (now - kept_seconds,)
        )

    async def revocations_after(self, after_id: int) -> list[tuple[int, Revocation]]:
        rows = self._db.execute(
            "SELECT id, task_id, lease_id, session_id, reason FROM lease_revocations WHERE id > ? "
            "ORDER BY id",
            (after_id,),
        ).fetchall()
        return [(row[0], Revocation._make(row[1:])) for row in rows]

    async def last_revocation_id(self) -> int:
        row = self._db.execute("SELECT coalesce(max(id), 0) FROM lease_revocations").fetchone()
        return int(row[0])

    def _selected(self, states: Sequence[str], selection: TaskSelection) -> list[tuple[Any, ...]]:
        """(id, state, lease_id, session_id, workflow, stage) of the selected tasks in
        `states`: by id, else one index range per stage and state (never the finished tasks)."""
        columns = "id, state, lease_id, session_id, workflow, stage"
        if selection.task_ids:
            in_states = f"state IN ({','.join('?' * len(states))})"
            return select_in(
                self._db,
                f"SELECT {columns} FROM tasks WHERE {in_states} AND id IN ({{ids}})",
                selection.task_ids,
                *states,
            )
        found = []
        for stage in selection.stages:
            for state in states:
                found += self._db.execute(
                    f"SELECT {columns} FROM tasks WHERE workflow = ? AND stage = ? AND state = ?",
                    (selection.workflow, stage, state),
                ).fetchall()
        return found

    async def cancel_tasks(self, selection: TaskSelection, now: float) -> list[CancelledTask]:
        found = {row[0]: row for row in self._selected(("ready", "leased", "dead"), selection)}
        moved = select_in(
            self._db,
            "UPDATE tasks SET state = 'cancelled', finished_at = ?, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL "
            "WHERE state IN ('ready', 'leased', 'dead') AND id IN ({ids}) RETURNING id",
            list(found),
            now,
        )
        cancelled = [CancelledTask._make(found[row[0]]) for row in moved]
        counts: Counter[CountKey] = Counter()
        for task in cancelled:
            counts[(task.workflow, task.stage, "cancelled")] += 1
            if task.state == "dead":
                counts[(task.workflow, task.stage, "dead")] -= 1
        self._counts(counts)
        return cancelled

    async def redrive_tasks(self, selection: TaskSelection, now: float) -> list[tuple[str, str]]:
        # OR IGNORE: a dead task whose run has a ready or leased task in the workflow again (the
        # unique index) stays dead.
        found = [row[0] for row in self._selected(("dead",), selection)]
        moved: list[tuple[str, str]] = select_in(
            self._db,
            "UPDATE OR IGNORE tasks SET state = 'ready', attempt = 0, ready_at = ?, "
            "finished_at = NULL, lease_id = NULL WHERE state = 'dead' AND id IN ({ids}) "
            "RETURNING workflow, stage",
            found,
            now,
        )
        self._counts(Counter({(w, s, "dead"): -n for (w, s), n in Counter(moved).items()}))
        return moved

    # --- reads ----------------------------------------------------------------------------------

    async def ended_counts(self, workflow: str) -> list[tuple[str, str, int]]:
        return self._db.execute(
            "SELECT stage, state, count FROM task_counts WHERE workflow = ?", (workflow,)
        ).fetchall()

    async def active_counts(
        self, workflow: str, stages: Sequence[str], now: float
    ) -> list[ActiveCounts]:
        counted = []
        for stage in stages:
            ready, scheduled, oldest = self._db.execute(
                "SELECT count(*), coalesce(sum(ready_at > ?), 0), "
                "min(CASE WHEN ready_at <= ? THEN ready_at END) "
                "FROM tasks WHERE state = 'ready' AND workflow = ? AND stage = ?",
                (now, now, workflow, stage),
            ).fetchone()
            (leased,) = self._db.execute(
                "SELECT count(*) FROM tasks WHERE workflow = ? AND stage = ? AND state = 'leased'",
                (workflow, stage),
            ).fetchone()
            age = None if oldest is None else now - oldest
            counted.append(ActiveCounts(stage, ready, scheduled, age, leased))
        return counted

    async def has_active(self, workflow: str, stages: Sequence[str]) -> bool:
        for stage in stages:
            for state in ("ready", "leased"):
                if self._db.execute(
                    "SELECT 1 FROM tasks WHERE workflow = ? AND stage = ? AND state = ? LIMIT 1",
                    (workflow, stage, state),
                ).fetchone():
                    return True
        return False

    def _with_failures(self, row: Sequence[Any]) -> TaskRecord:
        failures = [
            failure_record(failure)
            for failure in self._db.execute(
                "SELECT attempt, error, failed_at, holder FROM task_failures WHERE task_id = ? "
                "ORDER BY attempt",
                (row[0],),
            )
        ]
        return task_record(row, failures)

    async def task(self, task_id: int) -> TaskRecord | None:
        row = self._db.execute(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        return None if row is None else self._with_failures(row)

    async def task_sizes(
        self, where: TaskFilter, after_id: int, limit: int
    ) -> list[tuple[int, int]]:
        condition, args = _task_where(where, after_id)
        return self._db.execute(
            "SELECT id, coalesce(length(input), 0) + coalesce(length(output), 0) FROM tasks "
            f"WHERE {condition} ORDER BY id LIMIT ?",
            (*args, limit),
        ).fetchall()

    async def tasks_through(
        self, where: TaskFilter, after_id: int, last_id: int
    ) -> list[TaskRecord]:
        condition, args = _task_where(where, after_id)
        rows = self._db.execute(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {condition} AND id <= ? ORDER BY id",
            (*args, last_id),
        ).fetchall()
        return [self._with_failures(row) for row in rows]

    # --- API keys -------------------------------------------------------------------------------

    async def insert_key(self, key: ApiKeyRecord) -> ApiKeyRecord | None:
        row = self._db.execute(
            f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?) "
            f"ON CONFLICT DO NOTHING RETURNING {KEY_COLUMNS}",
            (
                key.name,
                json.dumps(key.scopes),
                json.dumps(key.collections),
                json.dumps(key.workflows),
                key.token_hash,
                key.subject,
                key.created_at,
                key.expires_at,
            ),
        ).fetchone()
        return None if row is None else key_record(row)

    async def keys(self) -> list[ApiKeyRecord]:
        return [
            key_record(row)
            for row in self._db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name")
        ]

    async def key(self, name: str) -> ApiKeyRecord | None:
        row = self._db.execute(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else key_record(row)

    async def revoke_key(self, name: str, now: float) -> None:
        self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (now, name)
        )

    async def keys_version(self) -> int:
        return int(
            self._db.execute("SELECT count(*) + count(revoked_at) FROM api_keys").fetchone()[0]
        )

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        self._db.executemany(
            "UPDATE api_keys SET last_used_at = ? WHERE name = ? "
            "AND (last_used_at IS NULL OR last_used_at < ?)",
            [(at, name, at) for name, at in used.items()],
        )
