"""The notifier: carries "tasks may be ready" and "lease revoked" between the server processes
that share one database.

Both are hints, never commands: a process told that tasks may be ready runs a claim pass (which
finds what is there), and one told of a revocation passes it to the stream holding the lease, if
it serves that stream. So a lost or repeated notice costs a pass at most, and the dispatcher's
own poll catches anything a notifier misses.

- `LocalNotifier`: one process; publishing calls the subscriber at once.
- `PollingNotifier`: several processes on one database: local delivery at once, and every
  `interval_seconds` a look at what others did: "anything committed?" (`Storage.change_marker`,
  SQLite's data version: no write, no table) wakes the dispatcher; revocations come from the small
  table the storage writes them to in the transaction that revoked them.
- LISTEN/NOTIFY carries both on PostgreSQL (the PostgreSQL adapter's own notifier).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from agentrun_server.storage._types import Revocation

if TYPE_CHECKING:
    from agentrun_server.storage import Storage

_log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.025

OnReady = Callable[[], None]
OnRevoked = Callable[[Sequence[Revocation]], None]


class Notifier(Protocol):
    """Publishes and delivers the two notices; `start` names the one subscriber (the dispatcher)."""

    async def start(self, on_ready: OnReady, on_revoked: OnRevoked) -> None:
        """Start delivering notices to the subscriber."""

    def tasks_ready(self, workflow: str, stages: Sequence[str]) -> None:
        """This process made tasks ready (ingested, enqueued, retried, completed onward)."""

    def leases_revoked(self, revocations: Sequence[Revocation]) -> None:
        """This process revoked leases (the storage recorded them for other processes)."""

    async def close(self) -> None:
        """Stop delivering."""


class LocalNotifier:
    """Notices within one process: publishing calls the subscriber at once."""

    def __init__(self) -> None:
        self._on_ready: OnReady | None = None
        self._on_revoked: OnRevoked | None = None

    async def start(self, on_ready: OnReady, on_revoked: OnRevoked) -> None:
        self._on_ready, self._on_revoked = on_ready, on_revoked

    def tasks_ready(self, workflow: str, stages: Sequence[str]) -> None:
        if self._on_ready is not None:
            self._on_ready()

    def leases_revoked(self, revocations: Sequence[Revocation]) -> None:
        if self._on_revoked is not None and revocations:
            self._on_revoked(revocations)

    async def close(self) -> None:
        self._on_ready = self._on_revoked = None


class PollingNotifier(LocalNotifier):
    """Local notices at once; other processes' every `interval_seconds` (see the module)."""

    def __init__(self, storage: Storage, interval_seconds: float = POLL_INTERVAL_SECONDS) -> None:
        super().__init__()
        self._storage = storage
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    async def start(self, on_ready: OnReady, on_revoked: OnRevoked) -> None:
        await super().start(on_ready, on_revoked)
        last_marker = await self._storage.change_marker()
        last_id, _ = await self._storage.revocations_after(-1)
        self._task = asyncio.create_task(self._poll(last_marker, last_id), name="agentrun-notifier")

    async def _poll(self, marker: int | None, last_id: int) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                current = await self._storage.change_marker()
                if current is not None and current == marker:
                    continue  # nothing committed anywhere since the last look
                marker = current
                last_id, revoked = await self._storage.revocations_after(last_id)
                if revoked and self._on_revoked is not None:
                    self._on_revoked(revoked)
                # A backend that cannot tell (None) leaves wake-ups to the dispatcher's poll.
                if current is not None and self._on_ready is not None:
                    self._on_ready()
            except Exception:
                _log.warning("notifier poll failed; retrying", exc_info=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await super().close()
