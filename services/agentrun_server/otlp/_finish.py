"""The sweep that finishes traces' runs: once a trace's root span has ended and no span has come
for `otlp_quiet_seconds`, its run is written whole from every span in start order and enters its
collection's workflow. Every server sweeps; each run finishes once."""

from __future__ import annotations

import logging
import time

from agentrun_server.otlp._metrics import OtlpMetrics
from agentrun_server.otlp._servicer import rebuild
from agentrun_server.serving import Periodic
from agentrun_server.storage import Storage

_log = logging.getLogger(__name__)

BATCH = 100
"""Runs finished per transaction."""


class TraceFinishSweep(Periodic):
    """A task on the server's event loop: `start()`, then `stop()` at shutdown."""

    name = "agentrun-trace-finish-sweep"
    what = "sweep of traces' runs to finish"

    def __init__(
        self,
        storage: Storage,
        metrics: OtlpMetrics,
        quiet_seconds: float,
        max_live_run_bytes: int,
    ) -> None:
        super().__init__(min(5.0, max(0.05, quiet_seconds / 4)))
        self._storage = storage
        self._metrics = metrics
        self._quiet = quiet_seconds
        self._max_bytes = max_live_run_bytes

    async def sweep(self) -> int:
        """Finish every trace's run that is quiet after its root now; how many."""
        total = 0
        while True:
            now = time.time()
            finished = await self._storage.finish_quiet_traces(
                now - self._quiet, rebuild, self._max_bytes, BATCH, now
            )
            total += len(finished)
            self._metrics.runs_finished.inc(len(finished))
            if len(finished) < BATCH:
                break
        if total:
            _log.debug("%d traces' runs finished", total)
        return total
