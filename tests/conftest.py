"""Shared fixtures: the real data folder, and servers on real sockets."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agentrun import AgentRun, load_agent_runs
from agentrun_server import Server, ServerConfig

from .postgres import fresh_database

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("AGENTRUN_SHARED_DATA", ROOT.parent / "shared" / "data"))
TAU_BENCH = SHARED_DATA / "tau-bench" / "gpt-4o-airline.json"
INSPECT_EVAL = SHARED_DATA / "inspect-intercode-ctf" / "log.eval"
INSPECT_JSON = SHARED_DATA / "inspect-intercode-ctf" / "ctf.json"
REAL_FILES = (TAU_BENCH, INSPECT_EVAL, INSPECT_JSON)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set AGENTRUN_SHARED_DATA)")
    return path


@pytest.fixture
def tau_bench_path() -> Path:
    """The real tau-bench trajectories; skips where ../shared/data is absent."""
    return _require(TAU_BENCH)


@pytest.fixture
def real_files() -> tuple[Path, ...]:
    """Every real file of runs: tau-bench (200 runs), Inspect .eval (15) and .json (2)."""
    return tuple(_require(path) for path in REAL_FILES)


@pytest.fixture(scope="session")
def real_runs() -> list[AgentRun]:
    """The 217 real runs of `real_files`, imported once per session."""
    return [run for path in REAL_FILES for run in load_agent_runs(_require(path))]


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh database of each backend: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'agentrun.db'}"
    else:
        with fresh_database() as url:
            yield url


@pytest.fixture
async def server(database: str) -> AsyncIterator[Server]:
    """Both services in this process, on a fresh database of each backend and a real port (0)."""
    s = Server(ServerConfig(db=database, port=0, metrics_port=-1, web_port=-1))
    await s.start()
    yield s
    await s.shutdown(grace_seconds=1)


def _built(tools: tuple[str, ...], target: str, install: str) -> None:
    """Build a client in another language with `make TARGET`; skip when its toolchain is
    missing, unless AGENTRUN_REQUIRE_TOOLCHAINS=1 (CI), where that fails."""
    absent = [tool for tool in tools if shutil.which(tool) is None]
    if absent:
        why = f"{', '.join(absent)} not installed: `make {install}` installs Debian's packages"
        if os.environ.get("AGENTRUN_REQUIRE_TOOLCHAINS") == "1":
            pytest.fail(f"{why} (AGENTRUN_REQUIRE_TOOLCHAINS=1)")
        pytest.skip(why)
    built = subprocess.run(
        ["make", "-s", target], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]


@pytest.fixture(scope="session")
def go_bin() -> Path:
    """The Go examples, built (and the Go client's unit tests run) by `make build-go`."""
    _built(("go",), "build-go", "install-go")
    return ROOT / "build" / "go" / "bin"


@pytest.fixture(scope="session")
def cpp_bin() -> Path:
    """The C++ client's programs, built by `make build-cpp` (CMake; the code generated from the
    protos at build time)."""
    _built(("cmake", "grpc_cpp_plugin"), "build-cpp", "install-cpp")
    return ROOT / "build" / "cpp"
