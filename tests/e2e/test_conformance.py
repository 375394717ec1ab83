"""One protocol, checked in every language: the conformance scenario (tests/conformance) run by
the Python, Go, C++ and TypeScript drivers against live servers, as `make conformance` runs it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import conformance  # noqa: E402  # scripts/conformance.py, the harness

STEPS = len(json.loads(conformance.SCENARIO.read_text())["steps"])


def _passes(language: str) -> None:
    passed, steps, output = conformance.run(language, conformance.drivers()[language], False)
    assert (passed, steps) == (STEPS, STEPS), output


def test_python() -> None:
    _passes("python")


def test_go(go_bin: Path) -> None:
    _passes("go")


def test_cpp(cpp_bin: Path) -> None:
    _passes("cpp")


def test_typescript() -> None:
    if shutil.which("node") is None or not (ROOT / "clients/typescript/node_modules").is_dir():
        pytest.skip("node or clients/typescript/node_modules is missing: `make install-ts`")
    _passes("typescript")


def test_a_driver_that_gets_an_answer_wrong_fails_its_step(tmp_path: Path) -> None:
    """The drivers' matching can fail: a scenario expecting a wrong count fails that step."""
    scenario = json.loads(conformance.SCENARIO.read_text())
    for step in scenario["steps"]:
        if step.get("call") == "IngestionService/UploadAgentRuns" and step["as"] == "ingester":
            step["expect"]["response"]["duplicateCount"] = 2
    wrong = tmp_path / "scenario.json"
    wrong.write_text(json.dumps(scenario))
    original, conformance.SCENARIO = conformance.SCENARIO, wrong
    try:
        passed, steps, output = conformance.run("python", conformance.drivers()["python"], False)
    finally:
        conformance.SCENARIO = original
    assert passed == steps - 1
    assert "FAIL an upload in two messages" in output and "duplicateCount" in output
