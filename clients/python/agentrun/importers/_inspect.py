"""Inspect AI eval logs: `.eval` (a zip of JSON files) and `.json` (one JSON document).

Each sample (one epoch of one dataset sample) becomes a run with one transcript, keyed "main",
holding the sample's messages. Read without the inspect-ai package: only the log's JSON is used.
"""

from __future__ import annotations

import json
import re
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from agentrun._agent_run import AgentRun
from agentrun._errors import FormatError
from agentrun._metadata import BaseAgentRunMetadata
from agentrun._transcript import Transcript
from agentrun.chat import (
    AssistantMessage,
    ChatMessage,
    Content,
    ContentReasoning,
    ContentText,
    SystemMessage,
    ToolCall,
    ToolCallContent,
    ToolMessage,
    UserMessage,
)
from agentrun.importers._common import RUN_ID_NAMESPACE, RecordError

# Inspect's score value constants, mapped as Inspect's own `value_to_float` maps them.
_SCORE_VALUES = {"C": 1.0, "I": 0.0, "P": 0.5, "N": 0.0}
_ATTACHMENT = re.compile(r"attachment://([0-9a-f]{32})")
_SAMPLE_FILE = re.compile(r"samples/.+\.json")


class InspectAgentRunMetadata(BaseAgentRunMetadata):
    """Metadata of a run imported from an Inspect AI log, as Docent's `InspectAgentRunMetadata`."""

    task_id: str = Field(description="The Inspect task that produced the run")
    sample_id: str = Field(description="The id of the dataset sample")
    epoch_id: int = Field(description="The epoch of the sample (1-based)")
    model: str = Field(description="The model that was evaluated")
    scoring_metadata: dict[str, Any] | None = Field(
        description="Each scorer's raw value, answer, explanation and metadata"
    )
    additional_metadata: dict[str, Any] | None = Field(
        description="The sample's target, its dataset metadata, usage, timing and limits"
    )


def is_inspect_json(data: Any) -> bool:
    """Whether a parsed JSON document is an Inspect log (`{"version", "eval", ...}`)."""
    return isinstance(data, dict) and "eval" in data and "version" in data


ZIP_ZSTANDARD = 93
"""The zip method of Zstandard, which Inspect's .eval logs use for their entries."""


def _zstandard(path: Path, archive: zipfile.ZipFile) -> None:
    """Make `zipfile` read Zstandard entries, as Inspect does to write them: natively from Python
    3.14, else through `zipfile-zstd` (a dependency of agentrun below 3.14), which patches it.

    Raises:
        FormatError: the log needs Zstandard and no reader for it is installed.
    """
    if not any(info.compress_type == ZIP_ZSTANDARD for info in archive.infolist()):
        return
    if hasattr(zipfile, "ZIP_ZSTANDARD"):
        return
    try:
        import zipfile_zstd  # noqa: F401  # registers the method with zipfile
    except ImportError as exc:
        raise FormatError(
            f"{path}: its entries are Zstandard-compressed (as Inspect writes .eval logs) and no "
            f"reader for that is installed: pip install zipfile-zstd ({exc})",
            path=str(path),
        ) from None


def eval_records(path: Path) -> Iterator[tuple[str, Any]]:
    """The samples of a `.eval` zip as `(member name, (sample, eval spec))`, read one at a time.
    Entries may be deflated or Zstandard-compressed (Inspect's current logs)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not an Inspect .eval file: {exc}", path=str(path)) from exc
    with archive:
        _zstandard(path, archive)
        try:
            header = json.loads(archive.read("header.json"))
        except KeyError:
            try:  # a log still being written has no header yet: its start journal has the spec
                header = json.loads(archive.read("_journal/start.json"))
            except KeyError as exc:
                raise FormatError(
                    f"{path}: not an Inspect .eval file: no header.json", path=str(path)
                ) from exc
        spec = header.get("eval")
        if not isinstance(spec, dict):
            raise FormatError(f"{path}: header.json: field eval: required", path=str(path))
        for name in sorted(n for n in archive.namelist() if _SAMPLE_FILE.fullmatch(n)):
            try:
                sample = json.loads(archive.read(name))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield (
                    name,
                    FormatError(
                        f"{path}: {name}: invalid JSON: {exc}", path=str(path), record=name
                    ),
                )
                continue
            yield name, (sample, spec)


def json_records(data: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The samples of a parsed `.json` log as `(samples[i], (sample, eval spec))`."""
    spec = data["eval"]
    for i, sample in enumerate(data.get("samples") or ()):
        yield f"samples[{i}]", (sample, spec)


def inspect_sample_run(sample: dict[str, Any], eval_spec: dict[str, Any]) -> AgentRun:
    """Convert one Inspect sample (one epoch) and its log's `eval` spec to a run.

    - Scores: each scorer's value. "C", "I", "P" and "N" become 1.0, 0.0, 0.5 and 0.0 as in
      Inspect's `value_to_float`; numbers and booleans are kept as they are; a dict value gives one
      score per key (`scorer.key`); other values are None. Raw values stay in `scoring_metadata`.
    - Messages: system, user, assistant (with `model`, tool calls and their views, reasoning
      parts) and tool messages (with `error`). Content parts other than text and reasoning (images,
      audio, documents) become a text placeholder such as `[image]`. `attachment://` references
      are resolved from the sample's attachments.
    - The run id is derived from the eval run, task, sample id and epoch, so importing the same
      log twice stores nothing twice.

    Raises:
        KeyError, TypeError, RecordError, pydantic.ValidationError: the sample is malformed.
    """
    if not isinstance(sample, dict):
        raise RecordError("(sample)", f"expected a JSON object, got {type(sample).__name__}")
    attachments = sample.get("attachments") or {}
    raw_messages = sample["messages"]
    if not isinstance(raw_messages, list):
        raise RecordError("messages", "expected a list")
    messages = [
        _message(_resolve(m, attachments), f"messages[{i}]") for i, m in enumerate(raw_messages)
    ]
    sample_id, epoch = str(sample["id"]), int(sample.get("epoch", 1))
    task = str(eval_spec.get("task", ""))
    scores, scoring = _scores(sample.get("scores") or {})
    eval_key = eval_spec.get("run_id") or eval_spec.get("eval_id") or eval_spec.get("task_id")
    run_id = uuid.uuid5(RUN_ID_NAMESPACE, f"inspect:{eval_key}:{task}:{sample_id}:{epoch}")
    additional = {
        key: sample[key]
        for key in (
            "target",
            "metadata",
            "model_usage",
            "total_time",
            "working_time",
            "limit",
            "error",
        )
        if sample.get(key) not in (None, {}, [])
    }
    additional["eval"] = {
        key: eval_spec[key]
        for key in ("run_id", "eval_id", "created", "task_version")
        if key in eval_spec
    }
    return AgentRun(
        id=str(run_id),
        name=f"{task} sample {sample_id} epoch {epoch}",
        transcripts={"main": Transcript(messages=messages)},
        metadata=InspectAgentRunMetadata(
            scores=scores,
            task_id=task,
            sample_id=sample_id,
            epoch_id=epoch,
            model=str(eval_spec.get("model", "")),
            scoring_metadata=scoring or None,
            additional_metadata=additional,
        ),
    )


def _resolve(value: Any, attachments: dict[str, str]) -> Any:
    """Replace `attachment://<hash>` references (Inspect moves long content there)."""
    if not attachments:
        return value
    if isinstance(value, str):
        if "attachment://" not in value:
            return value
        return _ATTACHMENT.sub(lambda m: attachments.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_resolve(v, attachments) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, attachments) for k, v in value.items()}
    return value


def _scores(raw: dict[str, Any]) -> tuple[dict[str, int | float | bool | None], dict[str, Any]]:
    scores: dict[str, int | float | bool | None] = {}
    scoring: dict[str, Any] = {}
    for name, score in raw.items():
        if not isinstance(score, dict):
            raise RecordError(f"scores.{name}", "expected a Score object")
        value = score.get("value")
        if isinstance(value, dict):
            for key, item in value.items():
                scores[f"{name}.{key}"] = _score_value(item)
        else:
            scores[name] = _score_value(value)
        scoring[name] = {k: v for k, v in score.items() if v is not None}
    return scores, scoring


def _score_value(value: Any) -> int | float | bool | None:
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if value in _SCORE_VALUES:
            return _SCORE_VALUES[value]
        lowered = value.strip().lower()
        if lowered in ("yes", "true"):
            return 1.0
        if lowered in ("no", "false"):
            return 0.0
        try:
            return float(lowered)
        except ValueError:
            return None
    return None


def _message(raw: Any, where: str) -> ChatMessage:
    if not isinstance(raw, dict):
        raise RecordError(where, f"expected a message object, got {type(raw).__name__}")
    role = raw.get("role")
    content = _content(raw.get("content"), where)
    message_id = raw.get("id")
    if role == "system":
        return SystemMessage(id=message_id, content=content)
    if role == "user":
        call_ids = raw.get("tool_call_id")
        if isinstance(call_ids, str):
            call_ids = [call_ids]
        return UserMessage(id=message_id, content=content, tool_call_id=call_ids)
    if role == "assistant":
        calls = [
            _tool_call(c, f"{where}.tool_calls[{i}]")
            for i, c in enumerate(raw.get("tool_calls") or ())
        ]
        return AssistantMessage(
            id=message_id, content=content, model=raw.get("model"), tool_calls=calls or None
        )
    if role == "tool":
        error = raw.get("error")
        return ToolMessage(
            id=message_id,
            content=content,
            tool_call_id=raw.get("tool_call_id"),
            function=raw.get("function"),
            error=error
            if isinstance(error, dict)
            else ({"message": str(error)} if error else None),
        )
    raise RecordError(f"{where}.role", f"unknown role {role!r}")


def _content(raw: Any, where: str) -> str | list[Content]:
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise RecordError(f"{where}.content", "expected a string or a list of content parts")
    parts: list[Content] = []
    for i, part in enumerate(raw):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(ContentText(text=part.get("text") or "", refusal=part.get("refusal")))
        elif kind == "reasoning":
            parts.append(
                ContentReasoning(
                    reasoning=part.get("reasoning") or "",
                    signature=part.get("signature"),
                    redacted=bool(part.get("redacted")),
                )
            )
        elif isinstance(kind, str):
            parts.append(ContentText(text=f"[{kind}]"))
        else:
            raise RecordError(f"{where}.content[{i}].type", "required")
    return parts


def _tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise RecordError(where, "expected a tool call object")
    arguments = raw.get("arguments")
    view = raw.get("view")
    return ToolCall(
        id=str(raw.get("id") or ""),
        function=str(raw.get("function") or ""),
        arguments=arguments if isinstance(arguments, dict) else {},
        type=raw.get("type") or "function",
        parse_error=raw.get("parse_error"),
        view=ToolCallContent.model_validate(view) if isinstance(view, dict) else None,
    )
