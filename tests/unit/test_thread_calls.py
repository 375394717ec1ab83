"""Sync stage functions on worker threads (`agentrun._thread_calls.ThreadCalls`): results and
exceptions reach their awaiting tasks, up to `workers` calls run at once and no more, a cancelled
wait leaves the rest unharmed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agentrun._thread_calls import ThreadCalls


async def test_results_and_exceptions_reach_their_callers_in_any_number() -> None:
    calls = ThreadCalls(4, "test")

    def square(n: int) -> int:
        if n == 13:
            raise ValueError("unlucky")
        return n * n

    try:
        futures = [calls.call(square, n) for n in range(200)]
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        calls.shutdown()
    assert [r for n, r in enumerate(results) if n != 13] == [n * n for n in range(200) if n != 13]
    assert isinstance(results[13], ValueError) and str(results[13]) == "unlucky"


async def test_up_to_workers_calls_run_at_once_and_no_more() -> None:
    calls = ThreadCalls(3, "test")
    running, most = [0], [0]
    lock = threading.Lock()
    release, three_running = threading.Event(), threading.Event()

    def hold() -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] == 3:
                three_running.set()
        release.wait(5)
        with lock:
            running[0] -= 1
        return threading.current_thread().name

    try:
        futures = [calls.call(hold) for _ in range(8)]
        assert await asyncio.to_thread(three_running.wait, 5)
        await asyncio.sleep(0.05)  # a fourth would have started by now
        assert most[0] == 3
        release.set()
        names = await asyncio.gather(*futures)
    finally:
        release.set()
        calls.shutdown()
    assert most[0] == 3 and set(names) <= {"test_0", "test_1", "test_2"}


async def test_a_cancelled_wait_does_not_disturb_the_other_results() -> None:
    calls = ThreadCalls(2, "test")
    gate = threading.Event()
    try:
        slow = calls.call(lambda: gate.wait(5) and "slow")
        quick = calls.call(lambda: "quick")
        slow.cancel()
        assert await quick == "quick"
        gate.set()
        after = calls.call(lambda: "after")
        assert await after == "after"  # the cancelled call's result was dropped quietly
        with pytest.raises(asyncio.CancelledError):
            await slow
    finally:
        gate.set()
        calls.shutdown()
