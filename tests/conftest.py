"""Shared fixtures: the real data folder, and servers on real sockets."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentrun_server import Server, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("AGENTRUN_SHARED_DATA", ROOT.parent / "shared" / "data"))
TAU_BENCH = SHARED_DATA / "tau-bench" / "gpt-4o-airline.json"


@pytest.fixture
def tau_bench_path() -> Path:
    """The real tau-bench trajectories; skips where ../shared/data is absent."""
    if not TAU_BENCH.exists():
        pytest.skip(f"real data not found at {TAU_BENCH} (set AGENTRUN_SHARED_DATA)")
    return TAU_BENCH


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """Both services in this process, on a real SQLite file and a real port (0)."""
    s = Server(ServerConfig(db=f"sqlite:///{tmp_path / 'agentrun.db'}", port=0, metrics_port=-1))
    await s.start()
    yield s
    await s.shutdown(grace_seconds=1)
