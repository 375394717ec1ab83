"""agentrun/Docent runs in JSON: the seed-era shape and Docent's later one."""

from __future__ import annotations

from typing import Any

from agentrun._agent_run import AgentRun
from agentrun.importers._common import RecordError, content_id


def docent_run(record: Any) -> AgentRun:
    """Validate one run dumped by agentrun or Docent (`model_dump()` or `model_dump_json()`).

    Both of Docent's shapes are read: the seed's (`transcripts` a dict, metadata with
    `_field_descriptions`) and the later one (`transcripts` a list, `metadata` a plain dict, which
    may lack `scores`: it gets empty scores). The rendered `text` key of a dump is ignored. A run
    without an `id` gets one derived from its content.

    Raises:
        RecordError, pydantic.ValidationError: the record is not a run.
    """
    if not isinstance(record, dict):
        raise RecordError("(run)", f"expected a JSON object, got {type(record).__name__}")
    record = dict(record)
    if "id" not in record:
        record["id"] = content_id(record)
    metadata = record.get("metadata")
    if isinstance(metadata, dict) and "scores" not in metadata:
        record["metadata"] = {**metadata, "scores": {}}
    elif metadata is None:
        record["metadata"] = {"scores": {}}
    return AgentRun.model_validate(record)
