"""Workflow files are held to the server's limits before anything is sent: a file the SDK
accepts is a workflow the server applies, and one it refuses names the field and the limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentrun import FormatError, WorkflowSpec, load_workflow


def _stages(count: int) -> list[dict[str, Any]]:
    return [{"name": f"s{i}"} for i in range(count)]


@pytest.mark.parametrize(
    ("workflow", "field", "message"),
    [
        ({"name": "grade runs", "stages": _stages(1)}, "name", "should match pattern"),
        ({"name": "w", "stages": _stages(201)}, "stages", "at most 200 items"),
        (
            {"name": "w", "stages": [{"name": "s", "pathways": {"ok": "next\u202estage"}}]},
            "stages[0].pathways.ok",
            "should match pattern",
        ),
        (
            {"name": "w", "stages": [{"name": "s", "max_attempts": 101}]},
            "stages[0].max_attempts",
            "less than or equal to 100",
        ),
        (
            {"name": "w", "stages": [{"name": "s", "lease_seconds": 8 * 24 * 3600}]},
            "stages[0].lease_seconds",
            "less than or equal to 604800",
        ),
    ],
    ids=["space-in-name", "201-stages", "rtl-in-pathway", "101-attempts", "8-day-lease"],
)
def test_a_workflow_file_outside_the_servers_limits_names_field_and_limit(
    tmp_path: Path, workflow: dict[str, Any], field: str, message: str
) -> None:
    import json

    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    with pytest.raises(FormatError) as refused:
        load_workflow(path)
    assert f"{field}: " in str(refused.value) and message in str(refused.value)


def test_the_limits_themselves_are_accepted() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "name": "a" * 128,
            "stages": [
                {
                    "name": f"s{i}",
                    "pathways": {f"p{j}": None for j in range(64)},
                    "max_attempts": 100,
                    "lease_seconds": 7 * 24 * 3600,
                }
                for i in range(200)
            ],
        }
    )
    assert len(spec.to_proto().stages) == 200


def test_durations_are_seconds_or_duration_texts(tmp_path: Path) -> None:
    path = tmp_path / "workflow.yaml"
    path.write_text(
        "name: w\nstages:\n  - name: s\n    lease_seconds: 5m\n"
        "    initial_backoff_seconds: 250ms\n    max_backoff_seconds: 1h30m\n"
        "  - name: t\n    lease_seconds: 90\n"
    )
    first, second = load_workflow(path).to_proto().stages
    assert first.lease_duration.ToNanoseconds() == 300 * 10**9
    assert first.retry_policy.initial_backoff.ToNanoseconds() == 250 * 10**6
    assert first.retry_policy.max_backoff.ToNanoseconds() == 5400 * 10**9
    assert second.lease_duration.ToNanoseconds() == 90 * 10**9
    path.write_text("name: w\nstages:\n  - name: s\n    lease_seconds: 5 minutes\n")
    with pytest.raises(
        FormatError, match=r"stages\[0\]\.lease_seconds: '5 minutes' is not a duration"
    ):
        load_workflow(path)
    path.write_text("name: w\nstages:\n  - name: s\n    lease_seconds: 8d\n")
    with pytest.raises(FormatError, match="less than or equal to 604800"):
        load_workflow(path)


def test_a_near_miss_of_a_field_names_the_field_meant(tmp_path: Path) -> None:
    path = tmp_path / "workflow.yaml"
    path.write_text("name: w\nstage:\n  - name: s\n")
    with pytest.raises(FormatError, match="stage: unknown field; did you mean 'stages'"):
        load_workflow(path)
    path.write_text("name: w\nstages:\n  - name: s\n    pathway: {ok: null}\n")
    with pytest.raises(
        FormatError, match=r"stages\[0\]\.pathway: unknown field; did you mean 'pathways'"
    ):
        load_workflow(path)


def test_a_yaml_syntax_error_names_its_line_and_cause_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "workflow.yaml"
    path.write_text("name: w\nstages:\n  - name: s\n    pathways: {ok: t\n  - name: t\n")
    with pytest.raises(FormatError) as refused:
        load_workflow(path)
    message = str(refused.value)
    assert message.startswith(f"{path}:5:") and "\n" not in message, message
    assert "flow mapping (from line 4)" in message, message
