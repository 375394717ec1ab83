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
from typing import TYPE_CHECKING

import psycopg

from agentrun_server.storage._notifier import LocalNotifier

if TYPE_CHECKING:
    from agentrun_server.storage import Storage

_log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
RECONNECT_SECONDS = 1.0


class ListenNotifier(LocalNotifier):
    """Local notices at once; other replicas' as PostgreSQL delivers them (see the module)."""

    def __init__(self, url: str, storage: Storage) -> None:
        super().__init__()
        self._url = url
        self._storage = storage
        self._task: asyncio.Task[None] | None = None
        self._last_revocation = 0

    async def start(self) -> None:
        self._last_revocation, _ = await self._storage.revocations_after(-1)
        self._task = asyncio.create_task(self._listen(), name="agentrun-pg-listener")

    async def _listen(self) -> None:
        first = True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True
                ) as conn:
                    await conn.execute("LISTEN agentrun_ready")
                    await conn.execute("LISTEN agentrun_revoked")
                    await conn.execute("LISTEN agentrun_events")
                    await self._poll()  # what happened while nobody listened
                    if not first:
                        self._events(None)
                    first = False
                    while True:
                        async for notice in conn.notifies(timeout=POLL_SECONDS):
                            if notice.channel == "agentrun_revoked":
                                await self._read_revocations()
                            elif notice.channel == "agentrun_events":
                                payload = notice.payload
                                self._events(None if payload == "*" else payload.split("\n"))
                            else:
                                self._ready()
                        await self._poll()  # every POLL_SECONDS, whatever was heard
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.warning("LISTEN connection lost; polling until it is back", exc_info=True)
                with contextlib.suppress(Exception):
                    await self._poll()
                await asyncio.sleep(RECONNECT_SECONDS)

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await super().close()
