"""The sweep that enters abandoned live runs into their workflow, for collections that ask for it
(`Collection.enter_workflow_on_abandon`).

Abandoned is decided when read (no event for `--live-run-timeout`), so nothing happens at the
moment a run falls silent; each server sweeps every quarter of the timeout (at most 30 s), and the
storage enters each run once however many replicas sweep at the same time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agentrun_server.ingestion._live import fold_finished
from agentrun_server.ingestion._metrics import IngestionMetrics
from agentrun_server.serving import Periodic
from agentrun_server.storage import Storage

_log = logging.getLogger(__name__)

BATCH = 100
"""Runs entered per transaction."""


class AbandonSweep(Periodic):
    """A task on the server's event loop: `start()`, then `stop()` at shutdown."""

    name = "agentrun-abandon-sweep"
    what = "sweep of abandoned live runs"

    def __init__(
        self,
        storage: Storage,
        live_run_timeout_seconds: float,
        metrics: IngestionMetrics,
        on_entered: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(min(30.0, max(0.05, live_run_timeout_seconds / 4)))
        self._storage = storage
        self._timeout = live_run_timeout_seconds
        self._metrics = metrics
        self._on_entered = on_entered

    async def sweep(self) -> int:
        """Enter every run abandoned now (of the collections that ask); return how many."""
        total = 0
        while True:
            now = time.time()
            entered = await self._storage.enter_abandoned(
                now - self._timeout, fold_finished, BATCH, now
            )
            total += len(entered)
            if len(entered) < BATCH:
                break
        if total:
            self._metrics.live_runs_entered_on_abandon.inc(total)
            _log.info("%d abandoned live runs entered their workflows", total)
            if self._on_entered is not None:
                self._on_entered()
        return total
