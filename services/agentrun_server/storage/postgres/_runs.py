"""Statements on collections, runs and workflow definitions. Each function takes the connection
(in its transaction) it runs on."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from psycopg.rows import tuple_row

from agentrun_server._errors import FailedPrecondition, NotFound, Unavailable
from agentrun_server.storage._rules import run_state_clause, take_within
from agentrun_server.storage._types import (
    Collection,
    InsertOutcome,
    InsertStatus,
    NewRun,
    StoredRun,
    WorkflowDef,
)
from agentrun_server.storage.postgres._engine import NOW, Connection

_COLLECTION_COLUMNS = "id, name, description, workflow, created_at, run_count, enter_on_abandon"
_RUN_COLUMNS = "id, collection_id, ingested_at, data, seq, state, updated_at, next_sequence"


class WorkflowCache:
    """Parsed definitions by name; a definition is re-read only when its version changed."""

    def __init__(self) -> None:
        self._parsed: dict[str, WorkflowDef] = {}

    async def get(self, conn: Connection, name: str) -> WorkflowDef:
        """The current definition of `name`.

        Raises:
            NotFound: no such workflow.
        """
        cursor = await conn.execute("SELECT version FROM workflows WHERE name = %s", (name,))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"no workflow named {name!r}")
        cached = self._parsed.get(name)
        if cached is not None and cached.version == row[0]:
            return cached
        cursor = await conn.execute(
            "SELECT version, definition, updated_at FROM workflows WHERE name = %s", (name,)
        )
        found = await cursor.fetchone()
        if found is None:
            raise NotFound(f"no workflow named {name!r}")
        parsed = WorkflowDef.from_json(name, found[1], found[0], found[2])
        current = self._parsed.get(name)
        if current is None or current.version < parsed.version:
            self._parsed[name] = parsed
        return parsed

    async def many(self, conn: Connection, names: set[str]) -> dict[str, WorkflowDef]:
        """The current definitions of `names`, by name."""
        return {name: await self.get(conn, name) for name in names}


async def notify_ready(conn: Connection, workflow: str) -> None:
    """Tell every replica that tasks of `workflow` may be ready (delivered at commit)."""
    await conn.execute("SELECT pg_notify('agentrun_ready', %s)", (workflow,))


async def create_collection(
    conn: Connection,
    workflows: WorkflowCache,
    name: str,
    description: str,
    workflow: str,
    now: float | None,
    enter_on_abandon: bool = False,
) -> tuple[Collection, bool]:
    """See `Storage.create_collection`."""
    if workflow:
        await workflows.get(conn, workflow)
    collection_id = str(uuid.uuid4())
    cursor = await conn.execute(
        "INSERT INTO collections (id, name, description, workflow, created_at, enter_on_abandon) "
        f"VALUES (%(id)s, %(name)s, %(description)s, %(workflow)s, {NOW}, %(abandon)s) "
        "ON CONFLICT (name) DO NOTHING RETURNING created_at",
        {
            "id": collection_id,
            "name": name,
            "description": description,
            "workflow": workflow,
            "now": now,
            "abandon": enter_on_abandon,
        },
    )
    created = await cursor.fetchone()
    if created is not None:
        made = Collection(
            collection_id, name, description, workflow, created[0], 0, enter_on_abandon
        )
        return made, True
    cursor = await conn.execute(
        f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE name = %s", (name,)
    )
    row = await cursor.fetchone()
    assert row is not None  # a collection is never deleted
    existing = Collection(*row)
    if workflow and existing.workflow != workflow:
        bound = repr(existing.workflow) if existing.workflow else "no workflow"
        raise FailedPrecondition(f"collection {name!r} exists bound to {bound}, not {workflow!r}")
    return existing, False


async def get_collection(conn: Connection, id: str, name: str) -> Collection:
    """See `Storage.get_collection`."""
    column, key = ("id", id) if id else ("name", name)
    cursor = await conn.execute(
        f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE {column} = %s", (key,)
    )
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"no collection with {column} {key!r}")
    return Collection(*row)


async def list_collections(conn: Connection) -> list[Collection]:
    """See `Storage.list_collections`."""
    cursor = await conn.execute(
        f"SELECT {_COLLECTION_COLUMNS} FROM collections ORDER BY created_at, id"
    )
    return [Collection(*row) for row in await cursor.fetchall()]


async def insert_runs(
    conn: Connection,
    workflows: WorkflowCache,
    collection_id: str,
    runs: Sequence[NewRun],
    now: float | None,
) -> list[InsertOutcome]:
    """See `Storage.insert_runs`. The first of each id is inserted unless stored already
    (`ON CONFLICT DO NOTHING`, RETURNING what went in); runs go as one binary bytea array."""
    cursor = await conn.execute("SELECT workflow FROM collections WHERE id = %s", (collection_id,))
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"no collection with id {collection_id!r}")
    workflow = await workflows.get(conn, row[0]) if row[0] else None
    first: dict[str, NewRun] = {}
    for run in runs:
        first.setdefault(run.id, run)
    unique = list(first.values())
    cursor = await conn.execute(
        "INSERT INTO agent_runs (id, collection_id, name, size_bytes, ingested_at, data) "
        f"SELECT r.id, %(collection)s, r.name, r.size, {NOW}, r.data "
        "FROM unnest(%(ids)s::text[], %(names)s::text[], %(sizes)s::int[], %(data)b::bytea[]) "
        "WITH ORDINALITY AS r(id, name, size, data, n) ORDER BY r.n "
        "ON CONFLICT (id) DO NOTHING RETURNING id",
        {
            "collection": collection_id,
            "ids": [run.id for run in unique],
            "names": [run.name for run in unique],
            "sizes": [len(run.data) for run in unique],
            "data": [bytes(run.data) for run in unique],
            "now": now,
        },
    )
    accepted = {r[0] for r in await cursor.fetchall()}
    refused = [run.id for run in unique if run.id not in accepted]
    owners: dict[str, str] = {}
    if refused:
        cursor = await conn.execute(
            "SELECT id, collection_id FROM agent_runs WHERE id = ANY(%s)", (refused,)
        )
        owners = dict(await cursor.fetchall())
    outcomes = []
    seen: set[str] = set()
    for run in runs:
        if run.id in accepted and run.id not in seen:
            outcomes.append(InsertOutcome(InsertStatus.ACCEPTED))
        elif run.id in accepted or owners.get(run.id) == collection_id:
            outcomes.append(InsertOutcome(InsertStatus.DUPLICATE))
        else:
            outcomes.append(InsertOutcome(InsertStatus.CONFLICT, owners.get(run.id)))
        seen.add(run.id)
    if workflow is not None and accepted:
        stage = workflow.first_stage
        await conn.execute(
            "INSERT INTO tasks (workflow, stage, agent_run_id, collection_id, state, "
            "max_attempts, created_at, ready_at) "
            f"SELECT %(workflow)s, %(stage)s, id, %(collection)s, 'ready', %(max)s, {NOW}, {NOW} "
            "FROM unnest(%(ids)s::text[]) AS id ON CONFLICT DO NOTHING",
            {
                "workflow": workflow.name,
                "stage": stage.name,
                "collection": collection_id,
                "max": stage.max_attempts,
                "ids": [run.id for run in unique if run.id in accepted],
                "now": now,
            },
        )
        await notify_ready(conn, workflow.name)
    if accepted:  # last: the collection's row stays locked until the commit that follows
        await conn.execute(
            "UPDATE collections SET run_count = run_count + %s WHERE id = %s",
            (len(accepted), collection_id),
        )
    return outcomes


async def get_run(conn: Connection, run_id: str) -> StoredRun:
    """See `Storage.get_run`."""
    async with conn.cursor(binary=True, row_factory=tuple_row) as cursor:
        await cursor.execute(f"SELECT {_RUN_COLUMNS} FROM agent_runs WHERE id = %s", (run_id,))
        row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"no agent run with id {run_id!r}")
    return StoredRun(*row)


async def list_runs(
    conn: Connection,
    collection_id: str,
    after_seq: int,
    limit: int,
    max_bytes: int | None,
    state: str | None = None,
    abandoned_before: float = 0.0,
) -> tuple[list[StoredRun], bool]:
    """See `Storage.list_runs`. Sizes are read first, so only the runs returned are read whole."""
    where, params = run_state_clause(state, abandoned_before, "%s")
    cursor = await conn.execute(
        f"SELECT seq, size_bytes FROM agent_runs WHERE collection_id = %s AND seq > %s{where} "
        "ORDER BY seq LIMIT %s",
        (collection_id, after_seq, *params, limit + 1),
    )
    sizes = await cursor.fetchall()
    kept, more = take_within([size for _, size in sizes], limit, max_bytes)
    if not kept:
        return [], False
    async with conn.cursor(binary=True, row_factory=tuple_row) as binary:
        await binary.execute(
            f"SELECT {_RUN_COLUMNS} FROM agent_runs "
            f"WHERE collection_id = %s AND seq > %s AND seq <= %s{where} ORDER BY seq",
            (collection_id, after_seq, sizes[kept - 1][0], *params),
        )
        return [StoredRun(*r) for r in await binary.fetchall()], more


async def run_collections(conn: Connection, run_ids: list[str]) -> dict[str, str]:
    """See `Storage.run_collections`."""
    cursor = await conn.execute(
        "SELECT id, collection_id FROM agent_runs WHERE id = ANY(%s)", (list(set(run_ids)),)
    )
    return dict(await cursor.fetchall())


async def count_runs(conn: Connection, collection_id: str) -> int:
    """See `Storage.count_runs`."""
    cursor = await conn.execute("SELECT run_count FROM collections WHERE id = %s", (collection_id,))
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def put_workflow(
    conn: Connection, workflows: WorkflowCache, workflow: WorkflowDef, now: float | None
) -> tuple[WorkflowDef, bool]:
    """See `Storage.put_workflow`. The row is locked while the new definition is checked."""
    definition = workflow.to_json()
    cursor = await conn.execute(
        "SELECT version, definition FROM workflows WHERE name = %s FOR UPDATE", (workflow.name,)
    )
    row = await cursor.fetchone()
    if row is not None and row[1] == definition:
        return await workflows.get(conn, workflow.name), False
    kept = [s.name for s in workflow.stages]
    cursor = await conn.execute(
        "SELECT stage, count(*) FROM tasks WHERE workflow = %s AND state IN ('ready', 'leased') "
        "AND NOT (stage = ANY(%s)) GROUP BY stage ORDER BY stage",
        (workflow.name, kept),
    )
    active = await cursor.fetchall()
    if active:
        held = ", ".join(f"{stage!r} ({n})" for stage, n in active)
        raise FailedPrecondition(
            f"workflow {workflow.name!r}: the new definition drops stages that still hold "
            f"ready or leased tasks: {held}"
        )
    version = 1 if row is None else row[0] + 1
    cursor = await conn.execute(
        "INSERT INTO workflows (name, version, definition, updated_at) "
        f"VALUES (%(name)s, %(version)s, %(definition)s, {NOW}) "
        "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
        "definition = excluded.definition, updated_at = excluded.updated_at "
        "WHERE workflows.version = %(previous)s RETURNING version",
        {
            "name": workflow.name,
            "version": version,
            "definition": definition,
            "previous": version - 1,
            "now": now,
        },
    )
    if await cursor.fetchone() is None:  # a first definition applied by another replica
        raise Unavailable(f"workflow {workflow.name!r} was changed meanwhile; apply it again")
    return await workflows.get(conn, workflow.name), True


async def list_workflows(conn: Connection, workflows: WorkflowCache) -> list[WorkflowDef]:
    """See `Storage.list_workflows`."""
    cursor = await conn.execute("SELECT name FROM workflows ORDER BY name")
    return [await workflows.get(conn, row[0]) for row in await cursor.fetchall()]
