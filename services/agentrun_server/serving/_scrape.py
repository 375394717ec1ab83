"""Metrics read from the database when Prometheus scrapes, so they are right whichever server
process made the change (task backlogs, live runs by state)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

_log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_SECONDS = 5.0
"""A scrape waits at most this long for the database; a slow one omits these families, never
hangs."""

T = TypeVar("T")


class ScrapedCollector(Collector, Generic[T]):
    """Runs `read` (a coroutine function) on the server's event loop at each scrape (which comes
    from the metrics HTTP thread) and yields `families(what it read)`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read: Callable[[], Coroutine[Any, Any, T]],
        families: Callable[[T], Iterator[Metric]],
        what: str,
    ) -> None:
        self._loop = loop
        self._read = read
        self._families = families
        self._what = what

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families are known only at scrape time

    def collect(self) -> Iterator[Metric]:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # waiting here would block the very loop that must read (a 5 s stall)
            _log.debug("%s metrics skipped: collected on the server's event loop", self._what)
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
            value = future.result(timeout=SCRAPE_TIMEOUT_SECONDS)
        except Exception:
            _log.warning("%s metrics skipped in this scrape", self._what, exc_info=True)
            return
        yield from self._families(value)
