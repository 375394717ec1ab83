"""The sweep that deletes runs older than their collection's retention (`Collection.retention_days`)
and gives the space back.

Every server sweeps every `interval_seconds`; the storage deletes each run once however many
replicas sweep at the same time, and passes over a run while a task of it is leased (a later sweep
takes it). A retention shortened by UpdateCollection is applied at the next sweep.
"""

from __future__ import annotations

import logging
import time

from agentrun_server.ingestion._metrics import IngestionMetrics
from agentrun_server.serving import Periodic
from agentrun_server.storage import Storage

_log = logging.getLogger(__name__)

BATCH = 500
"""Runs deleted per transaction."""
RECLAIM_BYTES = 32 * 1024 * 1024
"""Most bytes given back to the file system per call (each holds the write lock while it runs)."""


async def reclaim(storage: Storage, metrics: IngestionMetrics, max_bytes: int | None = None) -> int:
    """Give back what deleted rows left free, RECLAIM_BYTES a call, until none is left or
    `max_bytes` (None: no limit) is given back. A failure is logged, not raised: the space
    waits for the next sweep."""
    total = 0
    try:
        while max_bytes is None or total < max_bytes:
            given = await storage.reclaim_space(RECLAIM_BYTES)
            total += given
            if given < RECLAIM_BYTES:
                break
    except Exception:
        _log.warning("giving deleted runs' space back failed", exc_info=True)
    metrics.reclaimed_bytes.inc(total)
    return total


class RetentionSweep(Periodic):
    """A task on the server's event loop, sweeping at once and then every `interval_seconds`:
    `start()`, then `stop()` at shutdown."""

    name = "agentrun-retention-sweep"
    what = "sweep of runs past their retention"

    def __init__(
        self, storage: Storage, metrics: IngestionMetrics, interval_seconds: float = 300.0
    ) -> None:
        super().__init__(interval_seconds, at_start=True)
        self._storage = storage
        self._metrics = metrics

    async def sweep(self) -> int:
        """Delete every run past its collection's retention now; return how many."""
        total = 0
        while True:
            deleted = await self._storage.delete_expired(time.time(), BATCH)
            total += len(deleted)
            self._metrics.deleted_runs.labels("retention").inc(len(deleted))
            if len(deleted) < BATCH:
                break
        if total:
            _log.info("%d runs past their collection's retention deleted", total)
        await reclaim(self._storage, self._metrics)
        return total
