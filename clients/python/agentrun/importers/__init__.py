"""Read agent runs from the files users have, detecting the format.

Formats:

- agentrun/Docent JSON: a run, a list of runs, or `{"agent_runs": [...]}`; JSONL, one run per line.
  Both Docent's seed-era shape and its later one (list transcripts, dict metadata) are read.
- Inspect AI logs: `.eval` (zip) and `.json`; one run per sample and epoch, with
  `InspectAgentRunMetadata`.
- tau-bench trajectory files: a JSON list of `{task_id, trial, reward, info, traj}`.

Runs without an id get one derived from their content, so importing the same file twice and
uploading it twice stores nothing twice.

Errors: a malformed record raises `FormatError` naming the file, the record and the field. Pass
`on_invalid` to skip bad records instead: each one's `FormatError` is handed to it and the good
records of the file are still returned.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from agentrun._agent_run import AgentRun
from agentrun._errors import FormatError
from agentrun.importers._common import OnInvalid, content_id, convert_records
from agentrun.importers._docent import docent_run
from agentrun.importers._inspect import (
    InspectAgentRunMetadata,
    eval_records,
    inspect_sample_run,
    is_inspect_json,
    json_records,
)
from agentrun.importers._tau_bench import TAU_BENCH_KEYS, tau_bench_run

__all__ = [
    "InspectAgentRunMetadata",
    "OnInvalid",
    "content_id",
    "docent_run",
    "inspect_sample_run",
    "iter_agent_runs",
    "load_agent_runs",
    "load_docent_runs",
    "load_inspect_log",
    "load_tau_bench",
    "tau_bench_run",
]

_ZIP_MAGIC = b"PK\x03\x04"


def load_agent_runs(path: str | Path, *, on_invalid: OnInvalid | None = None) -> list[AgentRun]:
    """Read every run in a file of any supported format (see the module docstring).

    Raises:
        FormatError: the file cannot be read or its format is unknown; or a record is invalid and
            `on_invalid` is None.
    """
    return list(iter_agent_runs(path, on_invalid=on_invalid))


def iter_agent_runs(path: str | Path, *, on_invalid: OnInvalid | None = None) -> Iterator[AgentRun]:
    """Like `load_agent_runs`, one run at a time (an `.eval` log is read one sample at a time)."""
    path = Path(path)
    if _is_zip(path):
        yield from _convert_inspect(path, eval_records(path), on_invalid)
        return
    if path.suffix == ".jsonl":
        yield from convert_records(str(path), _jsonl_records(path), _any_run, on_invalid)
        return
    data = _read_json(path)
    if is_inspect_json(data):
        yield from _convert_inspect(path, json_records(data), on_invalid)
    else:
        yield from convert_records(str(path), _json_records(data), _any_run, on_invalid)


def load_inspect_log(path: str | Path, *, on_invalid: OnInvalid | None = None) -> list[AgentRun]:
    """Read an Inspect AI log (`.eval` or `.json`): one run per sample and epoch.

    See `inspect_sample_run` for how a sample maps to a run.

    Raises:
        FormatError: the file is not an Inspect log, or a sample is invalid (unless `on_invalid`).
    """
    path = Path(path)
    if _is_zip(path):
        return list(_convert_inspect(path, eval_records(path), on_invalid))
    data = _read_json(path)
    if not is_inspect_json(data):
        raise FormatError(f"{path}: not an Inspect log: no 'eval' and 'version'", path=str(path))
    return list(_convert_inspect(path, json_records(data), on_invalid))


def load_tau_bench(path: str | Path, *, on_invalid: OnInvalid | None = None) -> list[AgentRun]:
    """Read a tau-bench trajectory file; see `tau_bench_run` for the mapping.

    Raises:
        FormatError: the file is not JSON, or a record is invalid (unless `on_invalid`).
    """
    path = Path(path)
    records = _json_records(_read_json(path))
    return list(convert_records(str(path), records, tau_bench_run, on_invalid))


def load_docent_runs(path: str | Path, *, on_invalid: OnInvalid | None = None) -> list[AgentRun]:
    """Read agentrun/Docent runs from JSON or JSONL; see `docent_run`.

    Raises:
        FormatError: the file is not JSON/JSONL, or a record is invalid (unless `on_invalid`).
    """
    path = Path(path)
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _json_records(_read_json(path))
    return list(convert_records(str(path), records, docent_run, on_invalid))


def _convert_inspect(
    path: Path, records: Iterable[tuple[str, Any]], on_invalid: OnInvalid | None
) -> Iterator[AgentRun]:
    return convert_records(str(path), records, lambda pair: inspect_sample_run(*pair), on_invalid)


def _any_run(record: Any) -> AgentRun:
    if isinstance(record, dict) and record.keys() >= TAU_BENCH_KEYS:
        return tau_bench_run(record)
    if isinstance(record, dict) and "transcripts" in record:
        return docent_run(record)
    raise ValueError(
        "unknown format: expected an agent run (with 'transcripts') or a tau-bench trajectory "
        "(with 'task_id', 'reward', 'traj')"
    )


def _is_zip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == _ZIP_MAGIC
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc}", path=str(path)) from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read: {exc}", path=str(path)) from exc
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise FormatError(f"{path}: {where}: invalid JSON: {exc.msg}", path=str(path)) from exc


def _json_records(data: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("agent_runs"), list):
        data = data["agent_runs"]
    if not isinstance(data, list):
        data = [data]
    for i, record in enumerate(data):
        yield f"record {i}", record


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"line {line_no}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    at = f"{where}, column {exc.colno}"  # the line is one record: its own line 1
                    yield (
                        where,
                        FormatError(
                            f"{path}: {at}: invalid JSON: {exc.msg}", path=str(path), record=where
                        ),
                    )
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read: {exc}", path=str(path)) from exc
