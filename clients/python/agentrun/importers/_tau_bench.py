"""tau-bench trajectory files (`historical_trajectories/*.json`): OpenAI-style chat with tools."""

from __future__ import annotations

import json
from typing import Any

from agentrun._agent_run import AgentRun
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
from agentrun.importers._common import RecordError, content_id

TAU_BENCH_KEYS = frozenset({"task_id", "traj", "reward"})


def tau_bench_run(record: dict[str, Any]) -> AgentRun:
    """Convert one tau-bench trajectory (`historical_trajectories/*.json` record) to a run.

    The reward becomes `scores["reward"]`; `task_id`, `trial` and `info` become metadata; the
    OpenAI-style `traj` messages become one transcript, keyed "default", with tool-call arguments
    parsed from JSON.

    Raises:
        KeyError, TypeError, RecordError: the record lacks a field or has one of the wrong type.
    """
    if not isinstance(record.get("traj"), list):
        raise RecordError("traj", "expected a list of messages")
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
    raise RecordError(f"traj[{index}].role", f"unknown role {role!r}")


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
