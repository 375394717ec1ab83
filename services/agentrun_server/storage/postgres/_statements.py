"""The storage statements in PostgreSQL's SQL (`storage._statements.Statements`).

Sets travel as arrays (`unnest`), never as one statement per row. Locked reads use `FOR UPDATE`,
and `SKIP LOCKED` where replicas may reach for the same rows at once (a claim, the sweep), so they
take different rows instead of waiting for each other. Times are `NOW`: the database's clock,
unless the store runs on the caller's (tests). Ended tasks are counted on the connection's shard
of `task_counts` (`SHARD`), so that replicas ending tasks at once never wait on one counter row.
Notices are NOTIFYs, delivered at commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from psycopg.rows import tuple_row

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
    TraceState,
    WorkflowDef,
)
from agentrun_server.storage.postgres._engine import NOW, Connection

SHARD = "(pg_backend_pid() %% 16)"  # %% : a literal % in a statement with parameters
"""The task_counts shard a transaction adds to: its connection's."""
MAX_NOTIFY_BYTES = 7_900
"""NOTIFY's payload holds under 8,000 bytes: a longer list of runs wakes every watcher ("*")."""
READY, REVOKED, EVENTS = "agentrun_ready", "agentrun_revoked", "agentrun_events"
"""The channels (`postgres._notifier` listens)."""


def _taking(args: list[Any]) -> Callable[[Any], str]:
    """A `runs_sql` parameter taker: appends each value to `args`, placeholder `%s`."""

    def take(value: Any) -> str:
        args.append(value)
        return "%s"

    return take


def _task_where(where: TaskFilter, after_id: int) -> tuple[str, dict[str, Any]]:
    conditions = ["id > %(after)s"]
    params: dict[str, Any] = {"after": after_id}
    for column, value in (
        ("workflow", where.workflow),
        ("stage", where.stage),
        ("agent_run_id", where.agent_run_id),
    ):
        if value:
            conditions.append(f"{column} = %({column})s")
            params[column] = value
    if where.state is not None:
        conditions.append("state = %(state)s")
        params["state"] = where.state.value
    return " AND ".join(conditions), params


def _selection(selection: TaskSelection) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (without states) of a cancel or redrive, and its parameters."""
    if selection.task_ids:
        return "id = ANY(%(ids)s)", {"ids": list(selection.task_ids)}
    return "workflow = %(workflow)s AND stage = ANY(%(stages)s)", {
        "workflow": selection.workflow,
        "stages": list(selection.stages),
    }


def _runs_selected(selection: RunSelection, alias: str) -> tuple[str, dict[str, Any]]:
    """The WHERE clause of the runs a deletion names (agent_runs as `alias`), and its
    parameters."""
    if selection.run_ids:
        return f"{alias}.id = ANY(%(ids)s)", {"ids": list(selection.run_ids)}
    where = f"{alias}.collection_id = %(collection)s"
    params: dict[str, Any] = {"collection": selection.collection_id}
    if selection.ingested_before is not None:
        where += f" AND {alias}.ingested_at < %(before)s"
        params["before"] = selection.ingested_before
    return where, params


class PostgresStatements:
    """The statements of one transaction on one pooled connection.

    Args:
        conn: The connection, in the transaction the engine opened.
        caller_clock: Use the `now` callers pass instead of the database's clock (tests only).
    """

    def __init__(self, conn: Connection, caller_clock: bool = False) -> None:
        self._conn = conn
        self._caller_clock = caller_clock
        self._notified: set[tuple[str, str]] = set()

    def _now(self, now: float) -> float | None:
        return now if self._caller_clock else None

    async def _all(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        cursor = await self._conn.execute(sql, params)
        return await cursor.fetchall()

    async def _one(self, sql: str, params: Any = None) -> tuple[Any, ...] | None:
        cursor = await self._conn.execute(sql, params)
        return await cursor.fetchone()

    async def _binary(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        """Rows read in binary (bytea arrive as bytes, without hex decoding)."""
        async with self._conn.cursor(binary=True, row_factory=tuple_row) as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall()

    async def _notify(self, channel: str, payload: str = "") -> None:
        # A transaction's notices are delivered once each at commit: sending one again is waste.
        if (channel, payload) not in self._notified and (channel, "") not in self._notified:
            self._notified.add((channel, payload))
            await self._conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    async def _count(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        """Add to the kept counts of ended tasks, on this connection's shard."""
        changed = [(key, n) for key, n in counts.items() if n]
        if not changed:
            return
        await self._conn.execute(
            "INSERT INTO task_counts (workflow, stage, state, shard, count) "
            f"SELECT w, s, st, {SHARD}, n FROM unnest(%(w)s::text[], %(s)s::text[], "
            "%(st)s::text[], %(n)s::bigint[]) AS c(w, s, st, n) "
            "ON CONFLICT (workflow, stage, state, shard) "
            "DO UPDATE SET count = task_counts.count + excluded.count",
            {
                "w": [k[0] for k, _ in changed],
                "s": [k[1] for k, _ in changed],
                "st": [k[2] for k, _ in changed],
                "n": [n for _, n in changed],
            },
        )

    # --- collections and runs -------------------------------------------------------------------

    async def insert_collection(
        self, id: str, name: str, description: str, workflow: str, abandon: bool, now: float
    ) -> float | None:
        row = await self._one(
            "INSERT INTO collections (id, name, description, workflow, created_at, "
            f"enter_on_abandon) VALUES (%(id)s, %(name)s, %(description)s, %(workflow)s, {NOW}, "
            "%(abandon)s) ON CONFLICT (name) DO NOTHING RETURNING created_at",
            {
                "id": id,
                "name": name,
                "description": description,
                "workflow": workflow,
                "abandon": abandon,
                "now": self._now(now),
            },
        )
        return None if row is None else float(row[0])

    async def collection(self, column: str, key: str) -> Collection | None:
        row = await self._one(
            f"SELECT {COLLECTION_COLUMNS} FROM collections WHERE {column} = %s", (key,)
        )
        return None if row is None else collection_record(row)

    async def collections(self) -> list[Collection]:
        rows = await self._all(
            f"SELECT {COLLECTION_COLUMNS} FROM collections ORDER BY created_at, id"
        )
        return [collection_record(row) for row in rows]

    async def collection_workflow(self, collection_id: str) -> str | None:
        row = await self._one("SELECT workflow FROM collections WHERE id = %s", (collection_id,))
        return None if row is None else str(row[0])

    async def add_run_count(self, collection_id: str, runs: int) -> None:
        await self._conn.execute(
            "UPDATE collections SET run_count = run_count + %s WHERE id = %s",
            (runs, collection_id),
        )

    async def insert_runs(
        self, collection_id: str, runs: Sequence[NewRun], now: float
    ) -> dict[str, int]:
        # The runs go as one binary bytea array.
        rows = await self._all(
            "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data) "
            f"SELECT r.id, %(collection)s, r.name, r.size, {NOW}, r.data "
            "FROM unnest(%(ids)s::text[], %(names)s::text[], %(sizes)s::int[], "
            "%(data)b::bytea[]) WITH ORDINALITY AS r(id, name, size, data, n) ORDER BY r.n "
            "ON CONFLICT (id) DO NOTHING RETURNING id, seq",
            {
                "collection": collection_id,
                "ids": [run.id for run in runs],
                "names": [run.name for run in runs],
                "sizes": [len(run.data) for run in runs],
                "data": [bytes(run.data) for run in runs],
                "now": self._now(now),
            },
        )
        return {row[0]: int(row[1]) for row in rows}

    async def insert_facets(self, collection_id: str, rows: Sequence[tuple[int, Facet]]) -> None:
        if not rows:
            return
        await self._conn.execute(
            "INSERT INTO run_facets (run_seq, collection_id, key, num, text) "
            "SELECT f.seq, %(collection)s, f.key, f.num, f.text FROM unnest(%(seqs)s::bigint[], "
            "%(keys)s::text[], %(nums)s::float8[], %(texts)s::text[]) AS f(seq, key, num, text) "
            "ON CONFLICT DO NOTHING",
            {
                "collection": collection_id,
                "seqs": [seq for seq, _ in rows],
                "keys": [facet.key for _, facet in rows],
                "nums": [facet.num for _, facet in rows],
                "texts": [facet.text for _, facet in rows],
            },
        )

    async def run_seq(self, run_id: str) -> int | None:
        row = await self._one("SELECT seq FROM agent_runs WHERE id = %s", (run_id,))
        return None if row is None else int(row[0])

    async def facet_backfill(self) -> tuple[int, int]:
        row = await self._one("SELECT done, through FROM run_facets_backfill")
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def runs_between(self, after_seq: int, through: int, limit: int) -> list[StoredRun]:
        rows = await self._binary(
            f"SELECT {RUN_COLUMNS} FROM agent_runs WHERE seq > %s AND seq <= %s ORDER BY seq "
            "LIMIT %s",
            (after_seq, through, limit),
        )
        return [StoredRun(*row) for row in rows]

    async def advance_facet_backfill(self, done: int, to: int) -> bool:
        cursor = await self._conn.execute(
            "UPDATE run_facets_backfill SET done = %s WHERE done = %s", (to, done)
        )
        return bool(cursor.rowcount)

    async def run_collections(self, run_ids: Sequence[str]) -> dict[str, str]:
        rows = await self._all(
            "SELECT id, collection_id FROM agent_runs WHERE id = ANY(%s)", (list(run_ids),)
        )
        return dict(rows)

    async def run(self, run_id: str) -> StoredRun | None:
        rows = await self._binary(f"SELECT {RUN_COLUMNS} FROM agent_runs WHERE id = %s", (run_id,))
        return StoredRun(*rows[0]) if rows else None

    async def run_size(self, run_id: str) -> tuple[str, int] | None:
        row = await self._one(
            "SELECT collection_id, size_bytes FROM agent_runs WHERE id = %s", (run_id,)
        )
        return None if row is None else (str(row[0]), int(row[1]))

    async def run_sizes(self, query: RunQuery, after_seq: int, limit: int) -> list[tuple[int, int]]:
        args: list[Any] = []
        sql = runs_sql(query, "r.seq, r.size_bytes", after_seq, None, limit, _taking(args))
        return await self._all(sql, args)

    async def runs_through(self, query: RunQuery, after_seq: int, last_seq: int) -> list[StoredRun]:
        args: list[Any] = []
        sql = runs_sql(query, LISTED_RUN_COLUMNS, after_seq, last_seq, None, _taking(args))
        return [StoredRun(*row) for row in await self._binary(sql, args)]

    async def run_count(self, collection_id: str) -> int:
        row = await self._one("SELECT run_count FROM collections WHERE id = %s", (collection_id,))
        return int(row[0]) if row else 0

    # --- OpenTelemetry traces -------------------------------------------------------------------

    async def open_trace(self, run_id: str, now: float) -> None:
        await self._conn.execute(
            f"INSERT INTO otlp_traces (run_id, last_span_at) VALUES (%(run)s, {NOW}) "
            "ON CONFLICT (run_id) DO NOTHING",
            {"run": run_id, "now": self._now(now)},
        )

    async def trace(self, run_id: str) -> TraceState | None:
        # Locked: batches of one trace through several replicas take turns.
        row = await self._one(
            "SELECT state, root_ended, finished FROM otlp_traces WHERE run_id = %s FOR UPDATE",
            (run_id,),
        )
        return None if row is None else TraceState(row[0], bool(row[1]), bool(row[2]))

    async def stored_spans(self, run_id: str, span_ids: Sequence[str]) -> set[str]:
        rows = await self._all(
            "SELECT span_id FROM otlp_spans WHERE run_id = %s AND span_id = ANY(%s)",
            (run_id, list(span_ids)),
        )
        return {row[0] for row in rows}

    async def insert_spans(self, run_id: str, spans: Sequence[NewSpan]) -> None:
        await self._conn.execute(
            "INSERT INTO otlp_spans (run_id, span_id, start_ns, data) "
            "SELECT %s, s, t, d FROM unnest(%s::text[], %s::bigint[], %s::bytea[]) AS x(s, t, d)",
            (
                run_id,
                [span.span_id for span in spans],
                [span.start_ns for span in spans],
                [span.data for span in spans],
            ),
        )

    async def update_trace(self, run_id: str, state: bytes, root_ended: bool, now: float) -> None:
        await self._conn.execute(
            "UPDATE otlp_traces SET state = %(state)s, root_ended = root_ended OR %(root)s, "
            f"last_span_at = {NOW} WHERE run_id = %(run)s",
            {"state": state, "root": root_ended, "run": run_id, "now": self._now(now)},
        )

    async def traces_to_finish(self, quiet_before: float, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT run_id FROM otlp_traces WHERE root_ended AND NOT finished "
            "AND last_span_at < %s ORDER BY last_span_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (quiet_before, limit),
        )
        return [row[0] for row in rows]

    async def trace_spans(self, run_id: str) -> list[bytes]:
        rows = await self._binary(
            "SELECT data FROM otlp_spans WHERE run_id = %s ORDER BY start_ns, span_id", (run_id,)
        )
        return [row[0] for row in rows]

    async def finish_trace(self, run_id: str) -> None:
        await self._conn.execute(
            "UPDATE otlp_traces SET finished = true WHERE run_id = %s", (run_id,)
        )

    # --- deletion -------------------------------------------------------------------------------

    async def update_collection(
        self, collection_id: str, description: str | None, retention_days: int | None
    ) -> bool:
        cursor = await self._conn.execute(
            "UPDATE collections SET description = coalesce(%s, description), "
            "retention_days = coalesce(%s, retention_days) WHERE id = %s",
            (description, retention_days, collection_id),
        )
        return bool(cursor.rowcount)

    async def retained_collections(self) -> list[tuple[str, int]]:
        return await self._all(
            "SELECT id, retention_days FROM collections WHERE retention_days > 0"
        )

    async def runs_to_delete(
        self, selection: RunSelection, limit: int, skip_leased: bool
    ) -> list[DoomedRun]:
        where, params = _runs_selected(selection, "r")
        free = (
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.agent_run_id = r.id "
            "AND t.state = 'leased')"
            if skip_leased
            else ""
        )
        # Replicas sweeping at once take different runs (SKIP LOCKED).
        rows = await self._all(
            f"SELECT r.seq, r.id, r.collection_id FROM agent_runs r WHERE {where}{free} "
            "ORDER BY r.seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
            {**params, "limit": limit},
        )
        return [DoomedRun._make(row) for row in rows]

    async def leased_tasks(self, selection: RunSelection) -> list[LeasedTaskOfRun]:
        where, params = _runs_selected(selection, "r")
        rows = await self._all(
            "SELECT t.id, t.agent_run_id, t.workflow, t.stage FROM tasks t "
            f"JOIN agent_runs r ON r.id = t.agent_run_id WHERE t.state = 'leased' AND {where} "
            "ORDER BY t.id FOR UPDATE OF t",
            params,
        )
        return [LeasedTaskOfRun._make(row) for row in rows]

    async def delete_runs(self, runs: Sequence[DoomedRun]) -> int:
        ids = [run.id for run in runs]
        tasks = await self._all(
            "DELETE FROM tasks WHERE agent_run_id = ANY(%s) RETURNING id, workflow, stage, state",
            (ids,),
        )
        ended: dict[tuple[str, str, str], int] = {}
        for _, workflow, stage, state in tasks:
            if state in ENDED_STATES:
                ended[(workflow, stage, state)] = ended.get((workflow, stage, state), 0) - 1
        await self._count(ended)
        if tasks:
            await self._conn.execute(
                "DELETE FROM task_failures WHERE task_id = ANY(%s)", ([t[0] for t in tasks],)
            )
        await self._conn.execute(
            "DELETE FROM agent_run_events WHERE agent_run_id = ANY(%s)", (ids,)
        )
        await self._conn.execute("DELETE FROM otlp_spans WHERE run_id = ANY(%s)", (ids,))
        await self._conn.execute("DELETE FROM otlp_traces WHERE run_id = ANY(%s)", (ids,))
        await self._conn.execute(
            "DELETE FROM agent_runs WHERE seq = ANY(%s)", ([run.seq for run in runs],)
        )
        by_collection: dict[str, int] = {}
        for run in runs:
            by_collection[run.collection_id] = by_collection.get(run.collection_id, 0) + 1
        await self._conn.execute(
            "UPDATE collections c SET run_count = run_count - d.n "
            "FROM unnest(%s::text[], %s::bigint[]) AS d(id, n) WHERE c.id = d.id",
            (list(by_collection), list(by_collection.values())),
        )
        return len(tasks)

    async def delete_collection(self, collection_id: str) -> bool:
        # A run stored meanwhile by a transaction this one cannot see fails the foreign key
        # check: the engine runs the transaction again, which then sees the run.
        cursor = await self._conn.execute(
            "DELETE FROM collections WHERE id = %s AND NOT EXISTS "
            "(SELECT 1 FROM agent_runs WHERE collection_id = %s)",
            (collection_id, collection_id),
        )
        return bool(cursor.rowcount)

    # --- live runs ------------------------------------------------------------------------------

    async def live_run(self, run_id: str) -> LiveRunRow | None:
        row = await self._one(
            "SELECT collection_id, state, next_sequence, size_bytes, entered_at FROM agent_runs "
            "WHERE id = %s FOR UPDATE",
            (run_id,),
        )
        return None if row is None else LiveRunRow._make(row)

    async def stored_event(self, run_id: str, sequence: int) -> tuple[bytes | None, bytes] | None:
        return await self._one(
            "SELECT digest, data FROM agent_run_events WHERE agent_run_id = %s AND sequence = %s",
            (run_id, sequence),
        )

    async def event_patches(self, run_id: str) -> list[bytes]:
        rows = await self._all(
            "SELECT data FROM agent_run_events WHERE agent_run_id = %s ORDER BY sequence",
            (run_id,),
        )
        return [bytes(row[0]) for row in rows]

    async def open_live_run(self, event: NewEvent, now: float) -> bool:
        created = await self._one(
            "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data, "
            f"state, next_sequence, updated_at) VALUES (%(id)s, %(collection)s, NULL, %(size)s, "
            f"{NOW}, '', 'running', 2, {NOW}) ON CONFLICT (id) DO NOTHING RETURNING id",
            {
                "id": event.run_id,
                "collection": event.collection_id,
                "size": len(event.patch),
                "now": self._now(now),
            },
        )
        return created is not None

    async def advance_live_run(self, run_id: str, expected: int, size: int, now: float) -> None:
        await self._conn.execute(
            "UPDATE agent_runs SET next_sequence = %(next)s, size_bytes = %(size)s, "
            f"updated_at = {NOW}, state = 'running' WHERE id = %(id)s",
            {"next": expected + 1, "size": size, "id": run_id, "now": self._now(now)},
        )

    async def insert_event(self, event: NewEvent, now: float) -> None:
        await self._conn.execute(
            "INSERT INTO agent_run_events (agent_run_id, sequence, created_at, data, digest) "
            f"VALUES (%(id)s, %(sequence)s, {NOW}, %(data)s, %(digest)s)",
            {
                "id": event.run_id,
                "sequence": event.sequence,
                "data": event.patch,
                "digest": event.digest or None,
                "now": self._now(now),
            },
        )

    async def finish_run(
        self, run_id: str, data: bytes, name: str | None, enters: bool, now: float
    ) -> None:
        await self._conn.execute(
            "UPDATE agent_runs SET state = 'finished', data = %(data)s, name = %(name)s, "
            f"size_bytes = %(size)s, updated_at = {NOW}, "
            f"entered_at = CASE WHEN %(enters)s THEN {NOW} ELSE entered_at END WHERE id = %(id)s",
            {
                "data": data,
                "name": name,
                "size": len(data),
                "id": run_id,
                "enters": enters,
                "now": self._now(now),
            },
        )

    async def abandoned_to_enter(self, before: float, limit: int) -> list[tuple[str, str]]:
        # Read off the partial index agent_runs_to_enter; rows another sweep holds are skipped.
        return await self._all(
            "SELECT r.id, r.collection_id FROM agent_runs r "
            "JOIN collections c ON c.id = r.collection_id "
            "WHERE r.state = 'running' AND r.entered_at IS NULL AND r.updated_at < %s "
            "AND c.enter_on_abandon AND c.workflow != '' ORDER BY r.updated_at LIMIT %s "
            "FOR UPDATE OF r SKIP LOCKED",
            (before, limit),
        )

    async def enter_abandoned_run(
        self, run_id: str, data: bytes | None, name: str | None, now: float
    ) -> None:
        if data is None:
            await self._conn.execute(
                "UPDATE agent_runs SET entered_at = %s WHERE id = %s", (NOTHING_TO_ENTER, run_id)
            )
        else:
            await self._conn.execute(
                f"UPDATE agent_runs SET data = %(data)s, name = %(name)s, entered_at = {NOW} "
                "WHERE id = %(id)s",
                {"data": data, "name": name, "id": run_id, "now": self._now(now)},
            )

    async def run_header(self, run_id: str) -> StoredRun | None:
        row = await self._one(
            "SELECT id, collection_id, ingested_at, ''::bytea, seq, state, updated_at, "
            "next_sequence FROM agent_runs WHERE id = %s",
            (run_id,),
        )
        return None if row is None else StoredRun(*row)

    async def events_after(self, run_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self._all(
            "SELECT sequence, data FROM agent_run_events WHERE agent_run_id = %s "
            "AND sequence > %s ORDER BY sequence LIMIT %s",
            (run_id, after, limit),
        )
        return [(int(sequence), bytes(data)) for sequence, data in rows]

    async def event_sizes(self, run_id: str, after: int, limit: int) -> list[int]:
        # octet_length() of a TOASTed value reads its pointer, not the value.
        rows = await self._all(
            "SELECT octet_length(data) FROM agent_run_events WHERE agent_run_id = %s "
            "AND sequence > %s ORDER BY sequence LIMIT %s",
            (run_id, after, limit),
        )
        return [int(size) for (size,) in rows]

    async def live_run_counts(self, before: float) -> list[tuple[str, int, int]]:
        # Read off the partial index of running runs.
        rows = await self._all(
            "SELECT collection_id, count(*) FILTER (WHERE updated_at >= %(before)s), "
            "count(*) FILTER (WHERE updated_at < %(before)s) "
            "FROM agent_runs WHERE state = 'running' GROUP BY collection_id",
            {"before": before},
        )
        return [(str(c), int(running), int(abandoned)) for c, running, abandoned in rows]

    async def notify_events(self, run_ids: Sequence[str]) -> None:
        payload = "\n".join(run_ids)
        await self._notify(EVENTS, payload if len(payload.encode()) < MAX_NOTIFY_BYTES else "*")

    # --- workflows ------------------------------------------------------------------------------

    async def workflow_version(self, name: str) -> int | None:
        row = await self._one("SELECT version FROM workflows WHERE name = %s", (name,))
        return None if row is None else int(row[0])

    async def workflow(self, name: str) -> WorkflowDef | None:
        row = await self._one(
            "SELECT version, definition, updated_at FROM workflows WHERE name = %s", (name,)
        )
        return None if row is None else WorkflowDef.from_json(name, row[1], row[0], row[2])

    async def workflow_to_change(self, name: str) -> tuple[int, str] | None:
        return await self._one(
            "SELECT version, definition FROM workflows WHERE name = %s FOR UPDATE", (name,)
        )

    async def stages_holding_tasks(
        self, workflow: str, outside: Sequence[str]
    ) -> list[tuple[str, int]]:
        return await self._all(
            "SELECT stage, count(*) FROM tasks WHERE workflow = %s "
            "AND state IN ('ready', 'leased') AND NOT (stage = ANY(%s)) "
            "GROUP BY stage ORDER BY stage",
            (workflow, list(outside)),
        )

    async def store_workflow(self, name: str, version: int, definition: str, now: float) -> bool:
        stored = await self._one(
            "INSERT INTO workflows (name, version, definition, updated_at) "
            f"VALUES (%(name)s, %(version)s, %(definition)s, {NOW}) "
            "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
            "definition = excluded.definition, updated_at = excluded.updated_at "
            "WHERE workflows.version = %(previous)s RETURNING version",
            {
                "name": name,
                "version": version,
                "definition": definition,
                "previous": version - 1,
                "now": self._now(now),
            },
        )
        return stored is not None

    async def workflow_names(self) -> list[str]:
        return [row[0] for row in await self._all("SELECT name FROM workflows ORDER BY name")]

    async def counted_stages(self, workflow: str) -> list[str]:
        rows = await self._all(
            "SELECT DISTINCT stage FROM task_counts WHERE workflow = %s", (workflow,)
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
        rows = await self._all(
            "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, priority, "
            "max_attempts, created_at, ready_at) SELECT %(workflow)s, %(stage)s, r.id, "
            f"r.collection, 'ready', %(priority)s, %(max)s, {NOW}, {NOW} "
            "FROM unnest(%(ids)s::text[], %(collections)s::text[]) AS r(id, collection) "
            "ON CONFLICT DO NOTHING RETURNING id",
            {
                "workflow": workflow,
                "stage": stage.name,
                "priority": priority,
                "max": stage.max_attempts,
                "ids": [run_id for run_id, _ in runs],
                "collections": [collection_id for _, collection_id in runs],
                "now": self._now(now),
            },
        )
        return len(rows)

    async def claim_candidates(
        self, workflow: str, limits: Mapping[str, int], now: float
    ) -> list[Candidate]:
        # Each stage's first ready tasks off its own range of the tasks_ready index, locked;
        # those another replica holds locked are skipped, not waited for.
        rows = await self._all(
            "SELECT c.priority, c.ready_at, c.id, c.stage, c.size "
            "FROM unnest(%(stages)s::text[], %(limits)s::int[]) AS s(stage, lim) "
            "CROSS JOIN LATERAL (SELECT t.priority, t.ready_at, t.id, t.stage, "
            "coalesce(length(t.input), 0) + r.size_bytes AS size FROM tasks t "
            "JOIN agent_runs r ON r.id = t.agent_run_id "
            "WHERE t.state = 'ready' AND t.workflow = %(workflow)s AND t.stage = s.stage "
            f"AND t.ready_at <= {NOW} ORDER BY t.priority DESC, t.ready_at, t.id "
            "LIMIT s.lim FOR UPDATE OF t SKIP LOCKED) AS c",
            {
                "stages": list(limits),
                "limits": list(limits.values()),
                "workflow": workflow,
                "now": self._now(now),
            },
        )
        return [Candidate._make(row) for row in rows]

    async def lease_tasks(
        self, leases: Sequence[NewLease], holder: LeaseHolder, server_id: str, now: float
    ) -> list[LeasedTask]:
        rows = await self._binary(
            "WITH c AS (SELECT * FROM unnest(%(ids)s::bigint[], %(leases)s::text[], "
            "%(seconds)s::float8[]) AS c(id, lease_id, seconds)), "
            "u AS (UPDATE tasks t SET state = 'leased', attempt = t.attempt + 1, "
            "lease_id = c.lease_id, session_id = %(session)s, holder = %(holder)s, "
            "server_id = %(server)s, "
            f"detached_at = NULL, lease_deadline = {NOW} + c.seconds FROM c "
            "WHERE t.id = c.id AND t.state = 'ready' "
            "RETURNING t.id, t.lease_id, t.attempt, t.max_attempts, t.lease_deadline, t.stage, "
            "t.agent_run_id, t.collection_id, t.priority, t.input, t.created_at) "
            "SELECT u.*, r.data FROM u JOIN agent_runs r ON r.id = u.agent_run_id",
            {
                "ids": [lease.task_id for lease in leases],
                "leases": [lease.lease_id for lease in leases],
                "seconds": [lease.seconds for lease in leases],
                "session": holder.session_id,
                "holder": holder.encode(),
                "server": server_id or None,
                "now": self._now(now),
            },
        )
        return [LeasedTask._make(row) for row in rows]

    async def settle_rows(self, task_ids: Sequence[int]) -> dict[int, SettleRow]:
        rows = await self._all(
            f"SELECT {SETTLE_COLUMNS}, NULL, session_id FROM tasks WHERE id = ANY(%s)",
            (list(set(task_ids)),),
        )
        return {row[0]: SettleRow._make(row) for row in rows}

    async def successors(self, task_ids: Sequence[int]) -> dict[int, int]:
        rows = await self._all(
            "SELECT previous_task_id, id FROM tasks WHERE previous_task_id = ANY(%s)",
            (list(set(task_ids)),),
        )
        return {row[0]: row[1] for row in rows}

    async def settle_row(self, task_id: int, lease_id: str) -> SettleRow | None:
        row = await self._one(
            f"SELECT {SETTLE_COLUMNS}, (SELECT error FROM task_failures f "
            "WHERE f.task_id = tasks.id AND f.lease_id = %s LIMIT 1), session_id FROM tasks "
            "WHERE id = %s",
            (lease_id, task_id),
        )
        return None if row is None else SettleRow._make(row)

    async def complete_tasks(
        self,
        done: Sequence[Completion],
        rows: Mapping[int, SettleRow],
        follow: Mapping[int, StageDef],
        now: float,
    ) -> dict[int, int | None]:
        # One statement: the tasks marked done (guarded), the next stages' tasks created, the
        # done counted, and the replicas told of the new tasks.
        next_stages = [follow.get(c.task_id) for c in done]
        moved = await self._all(
            "WITH d AS (SELECT * FROM unnest(%(ids)s::bigint[], %(leases)s::text[], "
            "%(pathways)s::text[], %(outputs)s::bytea[], %(next)s::text[], %(max)s::int[]) "
            "AS d(id, lease_id, pathway, output, next_stage, next_max)), "
            "done AS (UPDATE tasks t SET state = 'done', pathway = d.pathway, output = d.output, "
            f"finished_at = {NOW}, lease_deadline = NULL, session_id = NULL, server_id = NULL, "
            "detached_at = NULL FROM d "
            "WHERE t.id = d.id AND t.state = 'leased' AND t.lease_id = d.lease_id "
            "RETURNING t.id, t.workflow, t.stage, t.agent_run_id, t.collection_id, t.priority, "
            "t.output, d.next_stage, d.next_max), "
            "follow AS (INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
            "priority, max_attempts, created_at, ready_at, input, previous_task_id) "
            "SELECT workflow, next_stage, agent_run_id, collection_id, 'ready', priority, "
            f"next_max, {NOW}, {NOW}, output, id FROM done WHERE next_stage IS NOT NULL "
            "ON CONFLICT DO NOTHING RETURNING id, previous_task_id), "
            "counted AS (INSERT INTO task_counts (workflow, stage, state, shard, count) "
            f"SELECT workflow, stage, 'done', {SHARD}, count(*) FROM done GROUP BY workflow, stage "
            "ON CONFLICT (workflow, stage, state, shard) "
            "DO UPDATE SET count = task_counts.count + excluded.count) "
            f"SELECT done.id, follow.id, (SELECT pg_notify('{READY}', '') "
            "WHERE EXISTS (SELECT 1 FROM follow)) FROM done "
            "LEFT JOIN follow ON follow.previous_task_id = done.id",
            {
                "ids": [c.task_id for c in done],
                "leases": [c.lease_id for c in done],
                "pathways": [c.pathway for c in done],
                "outputs": [c.output for c in done],
                "next": [stage.name if stage else None for stage in next_stages],
                "max": [stage.max_attempts if stage else None for stage in next_stages],
                "now": self._now(now),
            },
        )
        if any(next_id is not None for _, next_id, _ in moved):
            self._notified.add((READY, ""))
        return {task_id: next_id for task_id, next_id, _ in moved}

    async def end_attempt(self, row: SettleRow, dead: bool, delay: float, now: float) -> bool:
        if dead:
            sql = (
                f"UPDATE tasks SET state = 'dead', finished_at = {NOW}, lease_deadline = NULL, "
                "session_id = NULL, server_id = NULL, detached_at = NULL "
                "WHERE id = %(task)s AND state = 'leased' AND lease_id = %(lease)s RETURNING id"
            )
        else:
            sql = (
                f"UPDATE tasks SET state = 'ready', ready_at = {NOW} + %(delay)s, "
                "lease_id = NULL, lease_deadline = NULL, session_id = NULL, server_id = NULL, "
                "detached_at = NULL "
                "WHERE id = %(task)s AND state = 'leased' AND lease_id = %(lease)s RETURNING id"
            )
        moved = await self._one(
            sql, {"task": row.task_id, "lease": row.lease_id, "delay": delay, "now": self._now(now)}
        )
        if moved is not None and dead:
            await self._count({(row.workflow, row.stage, "dead"): 1})
        return moved is not None

    async def record_failure(
        self, task_id: int, attempt: int, lease_id: str | None, error: str, now: float
    ) -> None:
        await self._conn.execute(
            "INSERT INTO task_failures (task_id, attempt, lease_id, error, failed_at, holder) "
            f"VALUES (%(task)s, %(attempt)s, %(lease)s, %(error)s, {NOW}, "
            "(SELECT holder FROM tasks WHERE id = %(task)s)) "
            "ON CONFLICT (task_id, attempt) DO UPDATE SET lease_id = excluded.lease_id, "
            "error = excluded.error, failed_at = excluded.failed_at, holder = excluded.holder",
            {
                "task": task_id,
                "attempt": attempt,
                "lease": lease_id,
                "error": error,
                "now": self._now(now),
            },
        )

    async def extend_lease(
        self, task_id: int, lease_id: str, seconds: float, now: float
    ) -> float | None:
        row = await self._one(
            f"UPDATE tasks SET lease_deadline = {NOW} + %(seconds)s WHERE id = %(task)s "
            "AND state = 'leased' AND lease_id = %(lease)s RETURNING lease_deadline",
            {"seconds": seconds, "task": task_id, "lease": lease_id, "now": self._now(now)},
        )
        return None if row is None else float(row[0])

    async def release_lease(self, item: Release, holder: str, now: float) -> tuple[str, str] | None:
        return await self._one(
            "UPDATE tasks SET state = 'ready', attempt = attempt - 1, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL, ready_at = CASE "
            f"WHEN %(delay)s > 0 THEN {NOW} + %(delay)s ELSE ready_at END "
            "WHERE id = %(task)s AND state = 'leased' AND lease_id = %(lease)s "
            "AND (%(holder)s = '' OR session_id IS NULL OR session_id = %(holder)s) "
            "RETURNING workflow, stage",
            {
                "delay": item.delay_seconds,
                "task": item.task_id,
                "lease": item.lease_id,
                "holder": holder,
                "now": self._now(now),
            },
        )

    async def notify_ready(self, workflow: str) -> None:
        await self._notify(READY, workflow)

    # --- leases ---------------------------------------------------------------------------------

    async def _leased(self, where: str, params: dict[str, Any]) -> list[SettleRow]:
        rows = await self._all(
            f"SELECT {SETTLE_COLUMNS}, NULL, session_id FROM tasks "
            f"WHERE state = 'leased' AND {where} ORDER BY id FOR UPDATE SKIP LOCKED",
            params,
        )
        return [SettleRow._make(row) for row in rows]

    async def session_leases(self, session_id: str) -> list[SettleRow]:
        return await self._leased("session_id = %(session)s", {"session": session_id})

    async def expired_leases(self, now: float) -> list[SettleRow]:
        return await self._leased(f"lease_deadline < {NOW}", {"now": self._now(now)})

    async def unresumed_leases(self, now: float, grace_seconds: float) -> list[SettleRow]:
        return await self._leased(
            f"session_id IS NULL AND detached_at <= {NOW} - %(grace)s",
            {"grace": grace_seconds, "now": self._now(now)},
        )

    async def end_leases(self, ends: Sequence[LeaseEnd], why: str, now: float) -> set[int]:
        rows = await self._all(
            "WITH e AS (SELECT * FROM unnest(%(ids)s::bigint[], %(leases)s::text[], "
            "%(dead)s::bool[]) AS e(id, lease_id, dead)), "
            "moved AS (UPDATE tasks t SET state = CASE WHEN e.dead THEN 'dead' ELSE 'ready' END, "
            f"ready_at = CASE WHEN e.dead THEN t.ready_at ELSE {NOW} END, "
            f"finished_at = CASE WHEN e.dead THEN {NOW} END, "
            "lease_id = CASE WHEN e.dead THEN t.lease_id END, lease_deadline = NULL, "
            "session_id = NULL, server_id = NULL, detached_at = NULL FROM e "
            "WHERE t.id = e.id AND t.state = 'leased' AND t.lease_id = e.lease_id "
            "RETURNING t.id, t.attempt, e.lease_id, t.workflow, t.stage, e.dead, t.holder), "
            "failures AS (INSERT INTO task_failures "
            "(task_id, attempt, lease_id, error, failed_at, holder) "
            f"SELECT id, attempt, lease_id, %(why)s, {NOW}, holder FROM moved "
            "ON CONFLICT (task_id, attempt) DO UPDATE SET lease_id = excluded.lease_id, "
            "error = excluded.error, failed_at = excluded.failed_at, holder = excluded.holder), "
            "counted AS (INSERT INTO task_counts (workflow, stage, state, shard, count) "
            f"SELECT workflow, stage, 'dead', {SHARD}, count(*) FROM moved WHERE dead "
            "GROUP BY workflow, stage ON CONFLICT (workflow, stage, state, shard) "
            "DO UPDATE SET count = task_counts.count + excluded.count) "
            "SELECT id FROM moved",
            {
                "ids": [end.row.task_id for end in ends],
                "leases": [end.row.lease_id for end in ends],
                "dead": [end.dead for end in ends],
                "why": why,
                "now": self._now(now),
            },
        )
        return {row[0] for row in rows}

    async def detach_leases(self, session_id: str, now: float) -> int:
        cursor = await self._conn.execute(
            f"UPDATE tasks SET session_id = NULL, server_id = NULL, detached_at = {NOW} "
            "WHERE state = 'leased' AND session_id = %(session)s",
            {"session": session_id, "now": self._now(now)},
        )
        return cursor.rowcount

    async def attach_lease(
        self, task_id: int, lease_id: str, holder: LeaseHolder, server_id: str
    ) -> tuple[float, str] | None:
        return await self._one(
            "UPDATE tasks SET session_id = %s, holder = %s, server_id = %s, detached_at = NULL "
            "WHERE id = %s AND state = 'leased' AND lease_id = %s RETURNING lease_deadline, stage",
            (holder.session_id, holder.encode(), server_id or None, task_id, lease_id),
        )

    async def record_heartbeat(self, server_id: str, host: str, pid: int, now: float) -> None:
        await self._conn.execute(
            "INSERT INTO servers (id, host, pid, started_at, heartbeat_at) "
            f"VALUES (%(id)s, %(host)s, %(pid)s, {NOW}, {NOW}) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            {"id": server_id, "host": host, "pid": pid, "now": self._now(now)},
        )

    async def delete_server(self, server_id: str) -> None:
        await self._conn.execute("DELETE FROM servers WHERE id = %s", (server_id,))

    async def detach_silent_servers(self, now: float, grace_seconds: float) -> None:
        await self._conn.execute(
            "WITH gone AS (DELETE FROM servers WHERE id IN (SELECT id FROM servers "
            f"WHERE heartbeat_at < {NOW} - %(grace)s FOR UPDATE SKIP LOCKED) "
            "RETURNING id, heartbeat_at) "
            "UPDATE tasks t SET session_id = NULL, server_id = NULL, "
            "detached_at = gone.heartbeat_at "
            "FROM gone WHERE t.state = 'leased' AND t.server_id = gone.id",
            {"grace": grace_seconds, "now": self._now(now)},
        )

    async def record_revocations(
        self, leases: Sequence[EndedLease], reason: str, now: float
    ) -> None:
        await self._conn.execute(
            "INSERT INTO lease_revocations (task_id, lease_id, session_id, reason, created_at) "
            f"SELECT task, lease, session, %(reason)s, {NOW} FROM unnest(%(tasks)s::bigint[], "
            "%(leases)s::text[], %(sessions)s::text[]) AS r(task, lease, session)",
            {
                "tasks": [e.task_id for e in leases],
                "leases": [e.lease_id for e in leases],
                "sessions": [e.session_id for e in leases],
                "reason": reason,
                "now": self._now(now),
            },
        )

    async def notify_revoked(self) -> None:
        await self._notify(REVOKED)

    async def forget_revocations(self, now: float, kept_seconds: float) -> None:
        await self._conn.execute(
            f"DELETE FROM lease_revocations WHERE created_at < {NOW} - %(kept)s",
            {"kept": kept_seconds, "now": self._now(now)},
        )

    async def revocations_after(self, after_id: int) -> list[tuple[int, Revocation]]:
        rows = await self._all(
            "SELECT id, task_id, lease_id, session_id, reason FROM lease_revocations "
            "WHERE id > %s ORDER BY id",
            (after_id,),
        )
        return [(row[0], Revocation._make(row[1:])) for row in rows]

    async def last_revocation_id(self) -> int:
        row = await self._one("SELECT coalesce(max(id), 0) FROM lease_revocations")
        return int(row[0]) if row else 0

    async def cancel_tasks(self, selection: TaskSelection, now: float) -> list[CancelledTask]:
        # The tasks are locked as they are chosen, so the state they had (a lease ended, a dead
        # letter counted out) is exact.
        where, params = _selection(selection)
        rows = await self._all(
            "WITH chosen AS (SELECT id, state, lease_id, session_id, workflow, stage FROM tasks "
            f"WHERE state IN ('ready', 'leased', 'dead') AND {where} ORDER BY id FOR UPDATE), "
            f"moved AS (UPDATE tasks t SET state = 'cancelled', finished_at = {NOW}, "
            "lease_deadline = NULL, session_id = NULL, server_id = NULL, detached_at = NULL "
            "FROM chosen WHERE t.id = chosen.id RETURNING t.id) "
            "SELECT chosen.* FROM chosen JOIN moved USING (id)",
            {**params, "now": self._now(now)},
        )
        cancelled = [CancelledTask._make(row) for row in rows]
        counts: dict[tuple[str, str, str], int] = {}
        for task in cancelled:
            key = (task.workflow, task.stage, "cancelled")
            counts[key] = counts.get(key, 0) + 1
            if task.state == "dead":
                dead = (task.workflow, task.stage, "dead")
                counts[dead] = counts.get(dead, 0) - 1
        await self._count(counts)
        return cancelled

    async def redrive_tasks(self, selection: TaskSelection, now: float) -> list[tuple[str, str]]:
        # Per run, its newest dead task, unless the run has a ready or leased task in the
        # workflow again (a race with one made meanwhile aborts the transaction: it runs again).
        where, params = _selection(selection)
        moved: list[tuple[str, str]] = await self._all(
            "WITH chosen AS (SELECT DISTINCT ON (agent_run_id, workflow) id FROM tasks d "
            f"WHERE state = 'dead' AND {where} AND NOT EXISTS (SELECT 1 FROM tasks a "
            "WHERE a.agent_run_id = d.agent_run_id AND a.workflow = d.workflow "
            "AND a.finished_at IS NULL) ORDER BY agent_run_id, workflow, id DESC) "
            f"UPDATE tasks t SET state = 'ready', attempt = 0, ready_at = {NOW}, "
            "finished_at = NULL, lease_id = NULL FROM chosen WHERE t.id = chosen.id "
            "AND t.state = 'dead' RETURNING t.workflow, t.stage",
            {**params, "now": self._now(now)},
        )
        counts: dict[tuple[str, str, str], int] = {}
        for workflow, stage in moved:
            key = (workflow, stage, "dead")
            counts[key] = counts.get(key, 0) - 1
        await self._count(counts)
        return moved

    # --- reads ----------------------------------------------------------------------------------

    async def ended_counts(self, workflow: str) -> list[tuple[str, str, int]]:
        rows = await self._all(
            "SELECT stage, state, sum(count) FROM task_counts WHERE workflow = %s "
            "GROUP BY stage, state",
            (workflow,),
        )
        return [(stage, state, int(n)) for stage, state, n in rows]

    async def active_counts(
        self, workflow: str, stages: Sequence[str], now: float
    ) -> list[ActiveCounts]:
        rows = await self._all(
            "SELECT s.stage, r.ready, r.scheduled, r.oldest_age, l.leased "
            "FROM unnest(%(stages)s::text[]) AS s(stage) "
            "CROSS JOIN LATERAL (SELECT count(*) AS ready, "
            f"count(*) FILTER (WHERE ready_at > {NOW}) AS scheduled, "
            f"{NOW} - min(ready_at) FILTER (WHERE ready_at <= {NOW}) AS oldest_age FROM tasks "
            "WHERE state = 'ready' AND workflow = %(workflow)s AND stage = s.stage) AS r "
            "CROSS JOIN LATERAL (SELECT count(*) AS leased FROM tasks "
            "WHERE state = 'leased' AND workflow = %(workflow)s AND stage = s.stage) AS l",
            {"stages": list(stages), "workflow": workflow, "now": self._now(now)},
        )
        return [ActiveCounts._make(row) for row in rows]

    async def has_active(self, workflow: str, stages: Sequence[str]) -> bool:
        row = await self._one(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE state = 'ready' AND workflow = %(w)s "
            "AND stage = ANY(%(s)s)) OR EXISTS (SELECT 1 FROM tasks WHERE state = 'leased' "
            "AND workflow = %(w)s AND stage = ANY(%(s)s))",
            {"w": workflow, "s": list(stages)},
        )
        return bool(row and row[0])

    async def _with_failures(self, rows: list[tuple[Any, ...]]) -> list[TaskRecord]:
        failures: dict[int, list[AttemptFailureRecord]] = {row[0]: [] for row in rows}
        if rows:
            for task_id, *failure in await self._all(
                "SELECT task_id, attempt, error, failed_at, holder FROM task_failures "
                "WHERE task_id = ANY(%s) ORDER BY task_id, attempt",
                (list(failures),),
            ):
                failures[task_id].append(failure_record(failure))
        return [task_record(row, failures[row[0]]) for row in rows]

    async def task(self, task_id: int) -> TaskRecord | None:
        row = await self._one(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %s", (task_id,))
        return None if row is None else (await self._with_failures([row]))[0]

    async def task_sizes(
        self, where: TaskFilter, after_id: int, limit: int
    ) -> list[tuple[int, int]]:
        condition, params = _task_where(where, after_id)
        return await self._all(
            "SELECT id, coalesce(length(input), 0) + coalesce(length(output), 0) FROM tasks "
            f"WHERE {condition} ORDER BY id LIMIT %(limit)s",
            {**params, "limit": limit},
        )

    async def tasks_through(
        self, where: TaskFilter, after_id: int, last_id: int
    ) -> list[TaskRecord]:
        condition, params = _task_where(where, after_id)
        rows = await self._all(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {condition} AND id <= %(last)s ORDER BY id",
            {**params, "last": last_id},
        )
        return await self._with_failures(rows)

    # --- API keys -------------------------------------------------------------------------------

    async def insert_key(self, key: ApiKeyRecord) -> ApiKeyRecord | None:
        row = await self._one(
            f"INSERT INTO api_keys ({KEY_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, NULL, %s) "
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
        )
        return None if row is None else key_record(row)

    async def keys(self) -> list[ApiKeyRecord]:
        return [
            key_record(row)
            for row in await self._all(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name")
        ]

    async def key(self, name: str) -> ApiKeyRecord | None:
        row = await self._one(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE name = %s", (name,))
        return None if row is None else key_record(row)

    async def revoke_key(self, name: str, now: float) -> None:
        await self._conn.execute(
            "UPDATE api_keys SET revoked_at = %s WHERE name = %s AND revoked_at IS NULL",
            (now, name),
        )

    async def keys_version(self) -> int:
        row = await self._one("SELECT count(*) + count(revoked_at) FROM api_keys")
        return int(row[0]) if row else 0

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        async with self._conn.cursor() as cursor:
            await cursor.executemany(
                "UPDATE api_keys SET last_used_at = %s WHERE name = %s "
                "AND (last_used_at IS NULL OR last_used_at < %s)",
                [(at, name, at) for name, at in used.items()],
            )
