"""The dispatcher's lifecycle on a real SQLite file."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from agentrun_server.orchestrator._dispatcher import Dispatcher
from agentrun_server.orchestrator._metrics import OrchestratorMetrics
from agentrun_server.storage import open_storage


async def test_stop_ends_the_loop_even_when_woken_in_the_same_instant(tmp_path: Path) -> None:
    # Python 3.11's asyncio.wait_for swallows a cancellation that arrives as the awaited event
    # fires: the loop went on polling, and a server's shutdown waited for it forever. A stream
    # that closes during shutdown wakes the dispatcher just as it is stopped, so this happens.
    storage = await open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        for _ in range(5):
            dispatcher = Dispatcher(storage, OrchestratorMetrics(CollectorRegistry()))
            await dispatcher.start()
            await asyncio.sleep(0.02)  # idle, waiting for a wakeup
            dispatcher.wake()
            await asyncio.sleep(0)  # the wakeup is delivered; the loop has not yet run on
            stopping = asyncio.create_task(dispatcher.stop())
            done, _ = await asyncio.wait({stopping}, timeout=2)
            assert done, "Dispatcher.stop() never returned"
    finally:
        await storage.close()
