"""The README's quick start, as a new user runs it: in a clean checkout with nothing beside it (no
../shared), the server started as `make run` starts it, then the README's own commands."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentrun import Client

from ..processes import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def quick_start_commands() -> list[str]:
    """The commands of the README's block after "Then, in another shell"."""
    text = (ROOT / "README.md").read_text()
    block = text.split("Then, in another shell", 1)[1].split("\n\n", 2)[1]
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [c for c in commands if c]


def checkout(into: Path) -> Path:
    """The project's files as a fresh clone of this tree would have them (tracked, or new and not
    ignored), copied to `into`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout ({listed.stderr.strip()})")
    for name in listed.stdout.splitlines():
        source = ROOT / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


def test_the_readme_quick_start_works_from_a_clone_alone(tmp_path: Path) -> None:
    clone = checkout(tmp_path / "agentrun")
    assert not (clone.parent / "shared").exists()
    commands = quick_start_commands()
    assert commands[0].startswith("agentrun workflow apply"), commands
    with ServerProcess(clone / "agentrun.db") as server:
        env = {
            **os.environ,
            "AGENTRUN_SERVER": server.url,
            "AGENTRUN_SHARED_DATA": str(tmp_path / "nothing-here"),
        }
        outputs = []
        for command in commands:
            words = shlex.split(command)
            if words[0] == "agentrun":
                words = [sys.executable, "-m", "agentrun._cli", *words[1:]]
            elif words[0] == "python":
                words = [sys.executable, *words[1:]]
            done = subprocess.run(
                words, cwd=clone, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
            outputs.append(done.stdout)
        with Client(server.url) as client:
            backlog = {s.stage: s for s in client.backlog("grading")}
            reviews = client.list_tasks("grading", "review")
        shown = subprocess.run(
            [sys.executable, "-m", "agentrun._cli", "tasks", "show", reviews[0].id],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert "24 stored" in outputs[1]
    assert (backlog["triage"].done_count, backlog["review"].done_count) == (24, 24)
    assert "airline" in outputs[3] and "24 runs" in outputs[3]
    assert '"verdict"' in shown and '"tool_calls"' in shown
