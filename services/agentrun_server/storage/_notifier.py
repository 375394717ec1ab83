"""The notifier: carries "tasks may be ready", "lease revoked" and "events landed on these runs"
between the server processes that share one database.

All are hints, never commands: a process told that tasks may be ready runs a claim pass (which
finds what is there), one told of a revocation passes it to the stream holding the lease, if it
serves that stream, and one told that events landed wakes the watchers of those runs, which read
what is there. So a lost or repeated notice costs a pass or a read at most, and the dispatcher's
own poll catches anything a notifier misses; a watcher of a quiet run costs nothing.

- `LocalNotifier`: one process; publishing calls the subscribers at once.
- `PollingNotifier`: several processes on one database: local delivery at once, and every
  `interval_seconds` a look at what others did: "anything committed?" (`change_marker`,
  SQLite's data version: no write, no table) wakes the dispatcher; revocations come from the small
  table the storage writes them to in the transaction that revoked them; runs with new events
  from the events table's newest rows, read only while this process has watchers.
- LISTEN/NOTIFY carries all three on PostgreSQL (the PostgreSQL adapter's own notifier).

Lifecycle: the server makes one notifier (`Storage.notifier()`), its parts `subscribe`, then
`start()`; `close()` at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from agentrun_server.storage._types import Revocation

_log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.025

OnReady = Callable[[], None]
OnRevoked = Callable[[Sequence[Revocation]], None]
OnEvents = Callable[[Sequence[str] | None], None]
"""Called with the ids of runs that got events, or None when any run may have (a notice lost)."""


class Notifier(Protocol):
    """Publishes and delivers the notices to the parts of the server that `subscribe`."""

    def subscribe(
        self,
        on_ready: OnReady | None = None,
        on_revoked: OnRevoked | None = None,
        on_events: OnEvents | None = None,
        events_wanted: Callable[[], bool] | None = None,
    ) -> None:
        """Deliver notices to these callbacks (any may be None); `events_wanted` says whether
        event notices are wanted now (any watcher open), so none are looked for otherwise."""

    async def start(self) -> None:
        """Start delivering notices from other processes."""

    def tasks_ready(self, workflow: str, stages: Sequence[str]) -> None:
        """This process made tasks ready (ingested, enqueued, retried, completed onward)."""

    def leases_revoked(self, revocations: Sequence[Revocation]) -> None:
        """This process revoked leases (the storage recorded them for other processes)."""

    def events_landed(self, run_ids: Sequence[str]) -> None:
        """This process stored events of these runs (the storage tells other processes)."""

    async def close(self) -> None:
        """Stop delivering."""


class PolledStorage(Protocol):
    """What `PollingNotifier` reads from storage."""

    async def change_marker(self) -> int | None: ...

    async def revocations_after(self, after_id: int) -> tuple[int, list[Revocation]]: ...

    async def events_landed_after(self, after_id: int) -> tuple[int, list[str] | None]: ...


class LocalNotifier:
    """Notices within one process: publishing calls the subscribers at once."""

    def __init__(self) -> None:
        self._on_ready: list[OnReady] = []
        self._on_revoked: list[OnRevoked] = []
        self._on_events: list[OnEvents] = []
        self._events_wanted: list[Callable[[], bool]] = []

    def subscribe(
        self,
        on_ready: OnReady | None = None,
        on_revoked: OnRevoked | None = None,
        on_events: OnEvents | None = None,
        events_wanted: Callable[[], bool] | None = None,
    ) -> None:
        if on_ready is not None:
            self._on_ready.append(on_ready)
        if on_revoked is not None:
            self._on_revoked.append(on_revoked)
        if on_events is not None:
            self._on_events.append(on_events)
        if events_wanted is not None:
            self._events_wanted.append(events_wanted)

    async def start(self) -> None:
        pass

    def tasks_ready(self, workflow: str, stages: Sequence[str]) -> None:
        self._ready()

    def leases_revoked(self, revocations: Sequence[Revocation]) -> None:
        if revocations:
            self._revoked(revocations)

    def events_landed(self, run_ids: Sequence[str]) -> None:
        if run_ids:
            self._events(run_ids)

    async def close(self) -> None:
        self._on_ready, self._on_revoked, self._on_events = [], [], []

    def _ready(self) -> None:
        for callback in self._on_ready:
            callback()

    def _revoked(self, revocations: Sequence[Revocation]) -> None:
        for callback in self._on_revoked:
            callback(revocations)

    def _events(self, run_ids: Sequence[str] | None) -> None:
        for callback in self._on_events:
            callback(run_ids)

    def _wants_events(self) -> bool:
        return any(wanted() for wanted in self._events_wanted) or (
            bool(self._on_events) and not self._events_wanted
        )


class PollingNotifier(LocalNotifier):
    """Local notices at once; other processes' every `interval_seconds` (see the module)."""

    def __init__(
        self, storage: PolledStorage, interval_seconds: float = POLL_INTERVAL_SECONDS
    ) -> None:
        super().__init__()
        self._storage = storage
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        marker = await self._storage.change_marker()
        revocation, _ = await self._storage.revocations_after(-1)
        self._task = asyncio.create_task(self._poll(marker, revocation), name="agentrun-notifier")

    async def _poll(self, marker: int | None, last_revocation: int) -> None:
        last_event: int | None = None  # where event notices stand; None while nobody watches
        while True:
            await asyncio.sleep(self._interval)
            try:
                current = await self._storage.change_marker()
                if current is not None and current == marker:
                    continue  # nothing committed anywhere since the last look
                marker = current
                last_revocation, revoked = await self._storage.revocations_after(last_revocation)
                if revoked:
                    self._revoked(revoked)
                if not self._wants_events():
                    last_event = None
                elif last_event is None:
                    # Watchers came since the last look: start from the newest event, and wake
                    # them all once for what landed before (they read what is there).
                    last_event, _ = await self._storage.events_landed_after(-1)
                    self._events(None)
                else:
                    last_event, runs = await self._storage.events_landed_after(last_event)
                    if runs is None or runs:
                        self._events(runs)
                # A backend that cannot tell (None) leaves wake-ups to the dispatcher's poll.
                if current is not None:
                    self._ready()
            except Exception:
                _log.warning("notifier poll failed; retrying", exc_info=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await super().close()
