"""Watchers of live runs (`WatchAgentRun`), woken when their runs get events: by this process's
appends at once, by other processes' through the notifier. A watcher of a quiet run waits on its
own event and reads nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence


class RunWatchers:
    """The open watches of this process, by run id."""

    def __init__(self) -> None:
        self._by_run: dict[str, set[asyncio.Event]] = {}

    @property
    def wanted(self) -> bool:
        """Whether any watch is open (event notices are looked for only then)."""
        return bool(self._by_run)

    def __len__(self) -> int:
        return sum(len(events) for events in self._by_run.values())

    @contextlib.contextmanager
    def watching(self, run_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the run may have new events, for the duration of the block."""
        woken = asyncio.Event()
        self._by_run.setdefault(run_id, set()).add(woken)
        try:
            yield woken
        finally:
            events = self._by_run.get(run_id)
            if events is not None:
                events.discard(woken)
                if not events:
                    del self._by_run[run_id]

    def wake(self, run_ids: Sequence[str] | None) -> None:
        """Wake the watchers of these runs (None: of every run: a notice may have been lost)."""
        if run_ids is None:
            for events in self._by_run.values():
                for woken in events:
                    woken.set()
            return
        for run_id in run_ids:
            for woken in self._by_run.get(run_id, ()):
                woken.set()
