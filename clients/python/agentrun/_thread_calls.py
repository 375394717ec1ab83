"""`ThreadCalls`: sync functions run on worker threads for an event loop, their results handed
back in batches.

`loop.run_in_executor` costs each call an executor work item, a `concurrent.futures.Future`
chained to an asyncio one, and a wakeup of the loop (a write to its self-pipe) per result. The
Runner calls a sync stage function per task, thousands a second: here a result waits in a deque,
and one wakeup delivers every result that came in before the loop got to it.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

_Job = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class ThreadCalls:
    """Up to `workers` threads (started as calls need them) running the calls given to `call`.

    Lifecycle as an executor's: `call` from the loop's thread, `shutdown` once; a call running
    at shutdown finishes on its thread (a thread cannot be stopped), its result dropped. The
    threads are daemons: a stage function still running when the process exits (its lease
    handed back after the drain's grace) does not hold the exit.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job (read on the loop's thread: a hint)
        self._lock = threading.Lock()
        self._done: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = (
            collections.deque()
        )
        self._delivery_due = False  # a `_deliver` is scheduled and has not run yet
        self._loop: asyncio.AbstractEventLoop | None = None

    def call(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run `function(*args)` on a worker thread; a future of its result (or exception).
        Cancelling the future does not stop the call."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((future, function, args))
        if self._jobs.qsize() > self._idle and len(self._threads) < self._workers:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return future

    def shutdown(self) -> None:
        """No more calls; the threads end once their current call returns."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                return
            future, function, args = job
            try:
                result, error = function(*args), None
            except BaseException as exc:  # handed to the awaiting task, as an executor would
                result, error = None, exc
            with self._lock:
                self._done.append((future, result, error))
                if self._delivery_due:
                    continue
                self._delivery_due = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop closed: nobody awaits the result
                return

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, collections.deque()
            self._delivery_due = False
        for future, result, error in done:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
