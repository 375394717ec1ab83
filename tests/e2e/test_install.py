"""The project installed as a user on another machine installs it: the wheel built from this
checkout (`make dist`'s, the distribution `agentrun-grpc`) into a fresh venv outside the checkout,
then the README's quick start run with that venv's `agentrun` and Python alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..processes import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_the_built_wheel_runs_the_quick_start_in_a_fresh_venv(tmp_path: Path) -> None:
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("agentrun_grpc-*-py3-none-any.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_ = venv / "bin"
    # Nothing of this checkout or of the test's own venv leaks in.
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    subprocess.run(
        [str(bin_ / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    where = subprocess.run(
        [
            str(bin_ / "python"),
            "-c",
            "import agentrun, agentrun_server; print(agentrun.__file__, agentrun_server.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where

    with ServerProcess(tmp_path / "agentrun.db", program=[str(bin_ / "agentrun")]) as server:
        env["AGENTRUN_SERVER"] = server.url

        def run(*command: str) -> str:
            done = subprocess.run(
                command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
            )
            assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
            return done.stdout

        agentrun = str(bin_ / "agentrun")
        run(agentrun, "workflow", "apply", str(ROOT / "examples" / "grading.yaml"))
        uploaded = run(
            agentrun,
            "upload",
            str(ROOT / "examples" / "runs.jsonl"),
            *("--collection", "airline", "--workflow", "grading"),
        )
        assert "24 stored" in uploaded, uploaded
        run(str(bin_ / "python"), str(ROOT / "examples" / "grading_worker.py"))
        stats = run(agentrun, "stats")
        assert "airline" in stats and "review" in stats, stats
        reviewed = run(agentrun, "tasks", "list", "grading", "--stage", "review", "--state", "done")
        assert len(reviewed.strip().splitlines()) > 1, reviewed  # a header and the done reviews
