"""Deadlines on a client's stream of requests: its first message within one, each next within
another, so that streams that never start or fall silent give their slots back.

`receive` bounds one wait (a stream's first message; an upload's next, which is large and rare).
`IdleTimeout` bounds every wait of a busy stream for the cost of a clock read per message: one
timer per stream, re-armed only when it fires, where a timeout per message would schedule and
cancel a timer each time (the Work stream's settles and live run events come by thousands a
second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TypeVar

from agentrun_server._errors import DeadlineExceeded

T = TypeVar("T")


async def receive(requests: AsyncIterator[T], seconds: float, why: str) -> T | None:
    """The stream's next message; None at its end.

    Raises:
        DeadlineExceeded: no message within `seconds`; `why` ends the message (the setting and
            what to do about it).
    """
    try:
        async with asyncio.timeout(seconds):  # wait_for can swallow a cancellation
            return await anext(requests)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise DeadlineExceeded(f"no message for {seconds:g} s ({why})") from None


class IdleTimeout:
    """Ends the block (the current task) with DeadlineExceeded when `touch()` was not called for
    `seconds`: call it as each message arrives.

        with IdleTimeout(30.0, "stream_idle_seconds") as idle:
            async for request in requests:
                idle.touch()
                ...
    """

    def __init__(self, seconds: float, why: str) -> None:
        self.seconds = seconds
        self._why = why
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def touch(self) -> None:
        """A message arrived: the stream is not idle."""
        self._last = self._loop.time()

    def __enter__(self) -> IdleTimeout:
        self._timer = self._loop.call_later(self.seconds, self._check)
        return self

    def _check(self) -> None:
        quiet = self._loop.time() - self._last
        if quiet < self.seconds:
            self._timer = self._loop.call_later(self.seconds - quiet, self._check)
        elif self._task is not None and not self._task.done():
            self._expired = True
            self._task.cancel()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._expired and isinstance(error, asyncio.CancelledError):
            assert self._task is not None
            self._task.uncancel()
            raise DeadlineExceeded(f"no message for {self.seconds:g} s ({self._why})") from None
