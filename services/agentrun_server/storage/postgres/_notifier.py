"""Notices between replicas on PostgreSQL: LISTEN/NOTIFY, with polling as the fallback.

The storage NOTIFYs inside the transactions that make tasks ready (`agentrun_ready`), revoke
leases (`agentrun_revoked`; the revocations themselves are rows of `lease_revocations`) or store
live runs' events (`agentrun_events`, the runs' ids), so a notice arrives only once its change is
committed. Each replica LISTENs on a connection of its own. Notices are hints: every
`POLL_SECONDS` (and whenever the listening connection is down) the notifier reads new revocations
and wakes the dispatcher anyway; watchers are woken all at once only when the listening
connection was lost (they may have missed a notice), never on a schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import psycopg

from agentrun_server.storage._notifier import LocalNotifier
from agentrun_server.storage.postgres._statements import EVENTS, READY, REVOKED

if TYPE_CHECKING:
    from agentrun_server.storage import Storage

_log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
CHANNELS = (READY, REVOKED, EVENTS)
RECONNECT_SECONDS = 1.0
CLOSE_SECONDS = 1.0


class ListenNotifier(LocalNotifier):
    """Local notices at once; other replicas' as PostgreSQL delivers them (see the module)."""

    def __init__(self, url: str, storage: Storage) -> None:
        super().__init__()
        self._url = url
        self._storage = storage
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[object] | None = None
        self._closing = False
        self._last_revocation = 0

    async def start(self) -> None:
        self._last_revocation, _ = await self._storage.revocations_after(-1)
        self._task = asyncio.create_task(self._listen(), name="agentrun-pg-listener")

    async def _listen(self) -> None:
        first = True
        while not self._closing:
            try:
                self._conn = conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True
                )
            except Exception:
                _log.warning("LISTEN connection failed; polling until it is back", exc_info=True)
                with contextlib.suppress(Exception):
                    await self._poll()
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            try:
                for channel in CHANNELS:
                    await conn.execute(f"LISTEN {channel}")
                await self._poll()  # what happened while nobody listened
                if not first:
                    self._events(None)  # notices may have been lost meanwhile
                first = False
                await self._hear(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._closing:
                    return
                _log.warning("LISTEN connection lost; polling until it is back", exc_info=True)
                with contextlib.suppress(Exception):
                    await self._poll()
                await asyncio.sleep(RECONNECT_SECONDS)
            finally:
                # Closed, not left to `async with`, whose rollback would wait for the lock that a
                # cancelled notices generator may still hold.
                await conn.close()

    async def _hear(self, conn: psycopg.AsyncConnection[object]) -> None:
        """Deliver notices as they come, and poll every POLL_SECONDS whatever is heard."""
        next_poll = time.monotonic() + POLL_SECONDS
        while True:
            heard: list[psycopg.Notify] = []
            # One batch at a time, the generator closed before anything is awaited: it holds the
            # connection's lock while it is open.
            notices = conn.notifies(timeout=max(0.0, next_poll - time.monotonic()), stop_after=1)
            async with contextlib.aclosing(notices):
                async for notice in notices:
                    heard.append(notice)
            revoked = False
            for notice in heard:
                if notice.channel == REVOKED:
                    revoked = True
                elif notice.channel == EVENTS:
                    self._events(None if notice.payload == "*" else notice.payload.split("\n"))
                else:
                    self._ready()
            if revoked:
                await self._read_revocations()
            if time.monotonic() >= next_poll:
                await self._poll()
                next_poll = time.monotonic() + POLL_SECONDS

    async def _read_revocations(self) -> None:
        self._last_revocation, revoked = await self._storage.revocations_after(
            self._last_revocation
        )
        if revoked:
            self._revoked(revoked)

    async def _poll(self) -> None:
        await self._read_revocations()
        self._ready()

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_SECONDS)
            if not task.done():
                # psycopg's wait for notices can swallow a cancellation that meets the timer of
                # its own timeout (seen after the event loop stood still, in tests): closing
                # the socket ends the wait, and the loop sees it is closing.
                conn = self._conn
                if conn is not None:
                    conn.pgconn.finish()
                await asyncio.wait({task}, timeout=CLOSE_SECONDS)
            if not task.done():
                _log.warning("the LISTEN task did not stop within %.0f s", 2 * CLOSE_SECONDS)
            elif not task.cancelled() and task.exception() is not None:
                _log.debug("the LISTEN task ended with %r", task.exception())
        await super().close()
