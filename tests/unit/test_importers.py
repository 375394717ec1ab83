"""Importers: format detection, the mapping of each format, and errors that name file/record/field."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from agentrun import AgentRun, BaseAgentRunMetadata, FormatError, Transcript
from agentrun.chat import AssistantMessage, ContentText, ToolMessage, UserMessage
from agentrun.importers import InspectAgentRunMetadata, load_agent_runs, load_inspect_log


def good_run(i: int) -> dict[str, Any]:
    return {
        "id": f"run-{i}",
        "transcripts": {"t": {"messages": [{"role": "user", "content": f"hi {i}"}]}},
        "metadata": {"scores": {"reward": i}},
    }


def inspect_sample(sample_id: int, **overrides: Any) -> dict[str, Any]:
    sample = {
        "id": sample_id,
        "epoch": 1,
        "target": "flag{x}",
        "messages": [
            {"role": "system", "content": "be good"},
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "look at attachment://0123456789abcdef0123456789abcdef",
                    },
                    {"type": "image", "image": "data:image/png;base64,AAAA"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", "reasoning": "hmm", "signature": "sig"},
                    {"type": "text", "text": "running"},
                ],
                "model": "m1",
                "tool_calls": [
                    {
                        "id": "c1",
                        "function": "bash",
                        "arguments": {"cmd": "ls"},
                        "type": "function",
                        "view": {"title": "bash", "format": "markdown", "content": "```ls```"},
                    }
                ],
            },
            {
                "role": "tool",
                "content": "oops\x00",
                "tool_call_id": "c1",
                "function": "bash",
                "error": {"type": "timeout", "message": "timed out"},
            },
        ],
        "scores": {
            "includes": {"value": "C", "answer": "flag{x}"},
            "multi": {"value": {"a": 2, "b": "I"}},
        },
        "metadata": {"tags": ["web"]},
        "attachments": {"0123456789abcdef0123456789abcdef": "THE ATTACHED TEXT"},
    }
    sample.update(overrides)
    return sample


def write_eval(path: Path, samples: dict[str, Any]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "header.json",
            json.dumps(
                {"version": 2, "eval": {"task": "ctf", "run_id": "r1", "model": "openai/m"}}
            ),
        )
        for name, sample in samples.items():
            data = sample if isinstance(sample, str) else json.dumps(sample)
            archive.writestr(f"samples/{name}.json", data)
    return path


def test_inspect_samples_map_to_runs(tmp_path: Path) -> None:
    path = write_eval(tmp_path / "log.eval", {"1_epoch_1": inspect_sample(1)})
    (run,) = load_agent_runs(path)
    assert isinstance(run.metadata, InspectAgentRunMetadata)
    assert run.metadata.scores == {"includes": 1.0, "multi.a": 2, "multi.b": 0.0}
    assert (run.metadata.task_id, run.metadata.sample_id, run.metadata.epoch_id) == ("ctf", "1", 1)
    assert run.metadata.model == "openai/m"
    assert run.metadata.scoring_metadata is not None
    assert run.metadata.scoring_metadata["includes"]["value"] == "C"
    _system, user, assistant, tool = run.transcripts["main"].messages
    assert user.text == "look at THE ATTACHED TEXT\n[image]"
    assert isinstance(assistant, AssistantMessage) and assistant.model == "m1"
    assert assistant.tool_calls and assistant.tool_calls[0].view is not None
    assert "```ls```" in run.text
    assert "<reasoning>\nhmm\n</reasoning>" in run.text
    assert isinstance(tool, ToolMessage)
    assert tool.error == {"type": "timeout", "message": "timed out"}
    assert tool.text == "oops\x00"
    # Ids come from the log, so a second import (and upload) gives the same runs.
    assert load_agent_runs(path)[0].id == run.id


def test_a_bad_sample_is_named_or_skipped(tmp_path: Path) -> None:
    bad_role = inspect_sample(2)
    bad_role["messages"][1]["role"] = "narrator"
    path = write_eval(
        tmp_path / "log.eval",
        {"1_epoch_1": inspect_sample(1), "2_epoch_1": bad_role, "3_epoch_1": "{not json"},
    )
    with pytest.raises(FormatError) as raised:
        load_inspect_log(path)
    error = raised.value
    assert (error.record, error.field) == ("samples/2_epoch_1.json", "messages[1].role")
    assert str(error).startswith(f"{path}: samples/2_epoch_1.json: field messages[1].role:")
    skipped: list[FormatError] = []
    runs = load_agent_runs(path, on_invalid=skipped.append)
    assert [r.metadata.sample_id for r in runs] == ["1"]
    assert [e.record for e in skipped] == ["samples/2_epoch_1.json", "samples/3_epoch_1.json"]
    assert "invalid JSON" in str(skipped[1])


def test_inspect_json_logs_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "log.json"
    log = {"version": 2, "eval": {"task": "t", "model": "m"}, "samples": [inspect_sample(5)]}
    path.write_text(json.dumps(log))
    (run,) = load_agent_runs(path)
    assert run.name == "t sample 5 epoch 1"


def test_jsonl_errors_name_the_line_and_field(tmp_path: Path) -> None:
    bad = good_run(2)
    bad["transcripts"]["t"]["messages"][0]["content"] = 42
    lines = [json.dumps(good_run(1)), "{oops", json.dumps(bad), "", json.dumps(good_run(3))]
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(FormatError) as raised:
        load_agent_runs(path)
    # The file's line and the column in it, once; not json's "line 1" of the line alone.
    assert (
        str(raised.value)
        == f"{path}: line 2, column 2: invalid JSON: Expecting property name enclosed in double quotes"
    )
    skipped: list[FormatError] = []
    runs = load_agent_runs(path, on_invalid=skipped.append)
    assert [r.id for r in runs] == ["run-1", "run-3"]
    assert [(e.record, e.field) for e in skipped] == [
        ("line 2", None),
        ("line 3", "transcripts.t.messages.0.user.content.str"),
    ]


def test_docent_dumps_of_both_eras_import(tmp_path: Path) -> None:
    seed_era = AgentRun(
        transcripts={"default": Transcript(messages=[UserMessage(content="q")])},
        metadata=BaseAgentRunMetadata(scores={"ok": True}, episode=3),
    )
    later = {
        "transcripts": [
            {"id": "tr-1", "messages": [{"role": "user", "content": "hi", "metadata": {"x": 1}}]}
        ],
        "metadata": {"model": "gpt"},
        "transcript_groups": [],
    }
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"agent_runs": [seed_era.model_dump(mode="json"), later]}))
    first, second = load_agent_runs(path)
    assert first == seed_era
    assert list(second.transcripts) == ["tr-1"]
    assert second.metadata.scores == {}
    assert second.metadata.get("model") == "gpt"
    # No id in the file: the id is derived from the content, the same on every import.
    assert load_agent_runs(path)[1].id == second.id


def test_tau_bench_errors_name_the_message(tmp_path: Path) -> None:
    record = {"task_id": 1, "trial": 0, "reward": 1.0, "info": {}, "traj": [{"role": "alien"}]}
    path = tmp_path / "tau.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(
        FormatError, match=r"tau.json: record 0: field traj\[0\].role: unknown role"
    ):
        load_agent_runs(path)


def test_an_unknown_format_says_what_was_expected(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"hello": 1}]))
    with pytest.raises(FormatError, match="unknown format: expected an agent run"):
        load_agent_runs(path)


def test_content_parts_keep_their_text(tmp_path: Path) -> None:
    path = write_eval(tmp_path / "log.eval", {"1_epoch_1": inspect_sample(1)})
    (run,) = load_agent_runs(path)
    assistant = run.transcripts["main"].messages[2]
    assert isinstance(assistant.content, list)
    assert ContentText(text="running") in assistant.content


def test_a_json_file_error_names_its_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "runs.json"
    path.write_text('[\n  {"id": "a",\n   "transcripts": [}\n]\n')
    with pytest.raises(FormatError) as raised:
        load_agent_runs(path)
    assert str(raised.value) == f"{path}: line 3, column 20: invalid JSON: Expecting value"
