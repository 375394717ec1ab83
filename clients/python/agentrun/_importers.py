"""Read agent runs from the files users have: agentrun/Docent JSON and JSONL, tau-bench trajectories.

Runs read from a file without an id get one derived from their content (uuid5), so uploading the
same file twice stores nothing twice.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentrun._agent_run import AgentRun
from agentrun._errors import FormatError
from agentrun._metadata import BaseAgentRunMetadata
from agentrun._transcript import Transcript
from agentrun.chat import (
    AssistantMessage,
    ChatMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)

# Namespace of the content-derived run ids (uuid5).
RUN_ID_NAMESPACE = uuid.UUID("5b0c2f6e-4a52-4c1e-9a43-0d6f1a7e2b90")

_TAU_BENCH_KEYS = frozenset({"task_id", "traj", "reward"})


def content_id(record: Any) -> str:
    """A stable run id for a record that has none: uuid5 of its canonical JSON."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(RUN_ID_NAMESPACE, canonical))


def load_agent_runs(path: str | Path) -> list[AgentRun]:
    """Read every run in a file, detecting its format.

    Formats: a JSON run, a JSON list of runs, `{"agent_runs": [...]}`, JSONL of runs (agentrun or
    Docent shapes), or a tau-bench trajectory file (a JSON list of `{task_id, trial, reward, info,
    traj}`).

    Raises:
        FormatError: the file cannot be read or parsed, or a record is not a valid run; the error
            names the file, the record and the field.
    """
    return list(iter_agent_runs(path))


def iter_agent_runs(path: str | Path) -> Iterator[AgentRun]:
    """Like `load_agent_runs`, one run at a time."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read: {exc}") from exc
    for index, record in enumerate(_records(path, text)):
        yield _to_run(path, index, record)


def _records(path: Path, text: str) -> list[Any]:
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("agent_runs"), list):
        return list(data["agent_runs"])
    return data if isinstance(data, list) else [data]


def _to_run(path: Path, index: int, record: Any) -> AgentRun:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        if record.keys() >= _TAU_BENCH_KEYS:
            return tau_bench_run(record)
        if "transcripts" in record:
            return _docent_run(record)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(run)"
        raise FormatError(f"{where}: field {field}: {first['msg']}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{where}: {exc}") from exc
    raise FormatError(
        f"{where}: unknown format: expected an agent run (with 'transcripts') or a tau-bench "
        "trajectory (with 'task_id', 'reward', 'traj')"
    )


def _docent_run(record: dict[str, Any]) -> AgentRun:
    if "id" not in record:
        record = {**record, "id": content_id(record)}
    return AgentRun.model_validate(record)


def tau_bench_run(record: dict[str, Any]) -> AgentRun:
    """Convert one tau-bench trajectory (`historical_trajectories/*.json` record) to a run.

    The reward becomes `scores["reward"]`; `task_id`, `trial` and `info` become metadata; the
    OpenAI-style `traj` messages become one transcript, keyed "default", with tool-call arguments
    parsed from JSON.

    Raises:
        KeyError, TypeError, ValueError: the record lacks a field or has one of the wrong type.
    """
    messages = [_openai_message(m, i) for i, m in enumerate(record["traj"])]
    task_id, trial = record["task_id"], record.get("trial")
    metadata = BaseAgentRunMetadata(
        scores={"reward": record["reward"]},
        benchmark="tau-bench",
        task_id=task_id,
        trial=trial,
        info=record.get("info", {}),
    )
    return AgentRun(
        id=content_id(record),
        name=f"tau-bench task {task_id} trial {trial}",
        transcripts={"default": Transcript(messages=messages)},
        metadata=metadata,
    )


def _openai_message(message: dict[str, Any], index: int) -> ChatMessage:
    role = message.get("role")
    content = message.get("content") or ""
    if role == "system":
        return SystemMessage(content=content)
    if role == "user":
        return UserMessage(content=content)
    if role == "assistant":
        calls = [_openai_tool_call(c) for c in message.get("tool_calls") or ()]
        return AssistantMessage(content=content, tool_calls=calls or None)
    if role == "tool":
        return ToolMessage(
            content=content, tool_call_id=message.get("tool_call_id"), function=message.get("name")
        )
    raise ValueError(f"traj[{index}].role: unknown role {role!r}")


def _openai_tool_call(call: dict[str, Any]) -> ToolCall:
    function = call["function"]
    raw = function.get("arguments") or "{}"
    arguments: dict[str, Any] = {}
    parse_error = None
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
        if isinstance(parsed, dict):
            arguments = parsed
        else:
            parse_error = f"arguments are not a JSON object: {raw}"
    except json.JSONDecodeError as exc:
        parse_error = f"invalid JSON arguments ({exc}): {raw}"
    return ToolCall(
        id=call.get("id") or "",
        function=function["name"],
        arguments=arguments,
        type=call.get("type") or "function",
        parse_error=parse_error,
    )
