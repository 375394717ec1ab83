"""The contract guarded: `buf breaking` (run by `make lint`) against the released image
(protos/released.txtpb) refuses a change that would break a client generated from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"
RELEASED = ROOT / "protos" / "released.txtpb"


def _breaking(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--exclude-imports", "--against", str(RELEASED)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def protos(tmp_path: Path) -> Path:
    if not BUF.exists():
        pytest.skip(f"no {BUF} (make install)")
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def _edit(folder: Path, file: str, old: str, new: str) -> None:
    path = folder / "protos" / "agentrun" / "v1" / file
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_the_protos_keep_the_released_contract(protos: Path) -> None:
    checked = _breaking(protos)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("file", "old", "new", "said"),
    [
        (
            "orchestrator_service.proto",
            "uint32 credits = 3;",
            "uint32 credits = 30;",
            'field "3" with name "credits"',
        ),
        (
            "workflow.proto",
            "string pathway = 13;",
            "int64 pathway = 13;",
            "type",
        ),
        (
            "agent_run.proto",
            'option go_package = "github.com/agentrun/agentrun/clients/go/agentrunv1;agentrunv1";',
            'option go_package = "example.com/other;other";',
            "go_package",
        ),
    ],
)
def test_a_breaking_change_is_refused_naming_what_broke(
    protos: Path, file: str, old: str, new: str, said: str
) -> None:
    _edit(protos, file, old, new)
    checked = _breaking(protos)
    assert checked.returncode != 0
    assert said in checked.stdout, checked.stdout
