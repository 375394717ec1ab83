"""The end of a background task of the server (a sweep, a backfill, a reloader): one way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

_log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended (nothing when None)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Periodic:
    """A sweep run every `interval_seconds` on the server's event loop, from `start()` until
    `stop()` (at shutdown). A sweep that fails (the database out of reach) is logged, and the next
    one tries again. Subclasses give `sweep`, `name` and `what` (for the log)."""

    name = "agentrun-periodic"
    what = "a periodic step"

    def __init__(self, interval_seconds: float, *, at_start: bool = False) -> None:
        self.interval_seconds = interval_seconds
        self._at_start = at_start
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """One pass; how many things it did."""
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        if not self._at_start:
            await asyncio.sleep(self.interval_seconds)
        while True:
            try:
                await self.sweep()
            except Exception:
                _log.warning(
                    "%s failed; trying again in %g s",
                    self.what,
                    self.interval_seconds,
                    exc_info=True,
                )
            await asyncio.sleep(self.interval_seconds)
