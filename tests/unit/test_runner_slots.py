"""The Runner's concurrency slots under cancellation (no server needed)."""

from __future__ import annotations

import asyncio

import pytest

from agentrun import Connection
from agentrun._runner import _Execution
from agentrun.v1 import workflow_pb2


async def test_a_task_cancelled_as_it_gets_its_slot_gives_the_slot_back() -> None:
    # A lease revoked (or a drain's grace ending) just as its slot frees up: the slot the
    # cancelled wait had just acquired must not be lost, or the runner runs one task fewer.
    session = _Execution(
        stages={},
        parameters={},
        workflow=workflow_pb2.Workflow(name="w"),
        connection=Connection(),
        num_retries=0,
        credits=1,
        max_tasks_per_stage=None,
        refresh_every=None,
        concurrency=1,
        drain_grace_seconds=1.0,
        progress=False,
        worker=None,
    )
    try:
        await session.slots.acquire()  # the only slot is taken
        waiter = asyncio.create_task(session._take_slot())
        await asyncio.sleep(0)  # the waiter waits for the slot
        session.slots.release()  # the slot goes to the waiter's acquire ...
        waiter.cancel()  # ... as the waiter is cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not session.slots.locked()
    finally:
        session.threads.shutdown()
