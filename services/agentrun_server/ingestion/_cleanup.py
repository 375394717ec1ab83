"""Deleting runs and collections by request: what UpdateCollection, DeleteCollection and
DeleteAgentRuns do once their targets are checked.

A deletion that names many runs goes `DELETE_BATCH` runs per transaction, so that it never holds
the database long; an unforced one first looks for leased tasks among all of them and refuses
before deleting any. Each deletion is audited (one line, even when it stops part way), and the
space it frees is given back to the file system (SQLite) as it goes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

from agentrun_server._errors import FailedPrecondition, InvalidArgument
from agentrun_server.auth import audit
from agentrun_server.ingestion._metrics import IngestionMetrics
from agentrun_server.ingestion._retention import reclaim
from agentrun_server.storage import Collection, Deleted, RunSelection, Storage, leased_message

MAX_RETENTION_DAYS = 36_500
"""A hundred years: past it, a retention is a typo."""
DELETE_BATCH = 500
"""Runs deleted per transaction."""
RECLAIM_BYTES_PER_CALL = 256 * 1024 * 1024
"""Space a deletion gives back before it answers; the retention sweep gives back the rest."""
MAX_DELETE_IDS = 1000
"""Run ids one DeleteAgentRuns may name (deleted in one transaction)."""


def check_retention(field: str, days: int) -> int:
    """A retention in days: 0 (kept until deleted) to MAX_RETENTION_DAYS."""
    if days > MAX_RETENTION_DAYS:
        raise InvalidArgument(
            f"{field}: {days:,} days, over the limit of {MAX_RETENTION_DAYS:,} (0: keep runs "
            "until they are deleted)"
        )
    return days


class Counts(TypedDict):
    """What a DeleteCollection or DeleteAgentRuns response counts."""

    deleted_run_count: int
    deleted_task_count: int
    revoked_lease_count: int


@dataclass
class Tally:
    """What a deletion removed, over its transactions."""

    runs: int = 0
    tasks: int = 0
    revoked: int = 0

    def counts(self) -> Counts:
        """The fields of a DeleteCollection or DeleteAgentRuns response."""
        return {
            "deleted_run_count": self.runs,
            "deleted_task_count": self.tasks,
            "revoked_lease_count": self.revoked,
        }

    def add(self, deleted: Deleted) -> None:
        self.runs += len(deleted.run_ids)
        self.tasks += deleted.tasks
        self.revoked += len(deleted.revoked)


class Cleanup:
    """Deletions over `storage`, counted in `metrics`."""

    def __init__(self, storage: Storage, metrics: IngestionMetrics) -> None:
        self._storage = storage
        self._metrics = metrics

    async def update_collection(
        self, collection: Collection, description: str | None, retention_days: int | None
    ) -> Collection:
        updated = await self._storage.update_collection(collection.id, description, retention_days)
        audit(
            "collections.update",
            collection=collection.name,
            description=description is not None,
            retention_days=retention_days,
        )
        return updated

    async def delete_collection(self, collection: Collection, force: bool) -> Tally:
        """Delete `collection` with its runs and their tasks.

        Raises:
            FailedPrecondition: unforced, a task of one of its runs is leased.
        """
        await self._refuse_if_leased(RunSelection(collection_id=collection.id), force)
        return await self._in_batches(
            lambda: self._storage.delete_collection(
                collection.id, force, DELETE_BATCH, time.time()
            ),
            "collections.delete",
            collection=collection.name,
            id=collection.id,
            force=force,
        )

    async def delete_runs(self, run_ids: Sequence[str], force: bool) -> tuple[Tally, list[str]]:
        """Delete runs by id, in one transaction; what went, and the ids that named no run.

        Raises:
            FailedPrecondition: unforced, a task of one of them is leased (nothing deleted).
        """
        unique = list(dict.fromkeys(run_ids))
        deleted = await self._storage.delete_runs(
            RunSelection(run_ids=unique), force, len(unique), time.time()
        )
        tally = Tally()
        self._counted(tally, deleted)
        audit(
            "runs.delete",
            run_ids=deleted.run_ids,
            force=force,
            tasks=tally.tasks,
            revoked=tally.revoked,
        )
        await reclaim(self._storage, self._metrics, RECLAIM_BYTES_PER_CALL)
        gone = set(deleted.run_ids)
        return tally, [run_id for run_id in unique if run_id not in gone]

    async def delete_runs_before(self, collection: Collection, before: float, force: bool) -> Tally:
        """Delete the runs of `collection` stored before `before` (epoch seconds).

        Raises:
            FailedPrecondition: unforced, a task of one of them is leased.
        """
        selection = RunSelection(collection_id=collection.id, ingested_before=before)
        await self._refuse_if_leased(selection, force)
        return await self._in_batches(
            lambda: self._storage.delete_runs(selection, force, DELETE_BATCH, time.time()),
            "runs.delete",
            collection=collection.name,
            ingested_before=before,
            force=force,
        )

    async def _in_batches(
        self, delete: Callable[[], Awaitable[Deleted]], action: str, **touched: object
    ) -> Tally:
        """Call `delete` until its selection is gone; audited as `action` (with what went,
        however far it got) and the space given back."""
        tally = Tally()
        try:
            while True:
                deleted = await delete()
                self._counted(tally, deleted)
                if not deleted.more:
                    break
        finally:
            audit(action, **touched, runs=tally.runs, tasks=tally.tasks, revoked=tally.revoked)
            await reclaim(self._storage, self._metrics, RECLAIM_BYTES_PER_CALL)
        return tally

    async def _refuse_if_leased(self, selection: RunSelection, force: bool) -> None:
        if force:
            return
        leased = await self._storage.leased_tasks(selection)
        if leased:
            raise FailedPrecondition(leased_message(leased, len({t.run_id for t in leased})))

    def _counted(self, tally: Tally, deleted: Deleted) -> None:
        tally.add(deleted)
        self._metrics.deleted_runs.labels("request").inc(len(deleted.run_ids))
