"""`AgentRun`, as in Docent's seed-era `docent.data_models.agent_run`."""

from __future__ import annotations

import sys
from typing import Any, Literal, TypedDict
from uuid import uuid4

from pydantic import BaseModel, Field, field_serializer, field_validator, model_validator

from agentrun._chunking import render_text, split_run_text
from agentrun._metadata import BaseAgentRunMetadata
from agentrun._transcript import Transcript, render_yaml


class FilterableField(TypedDict):
    """A metadata path usable as a filter, with its value type."""

    name: str
    type: Literal["str", "bool", "int", "float"]


class AgentRun(BaseModel):
    """A complete run of an agent: one or more transcripts plus metadata with scores.

    Attributes:
        id: Unique identifier, uuid4 by default. It is the idempotency key of ingestion: uploading
            a run whose id is stored already stores nothing and reports a duplicate.
        name: Optional human-readable name, rendered into the metadata block.
        description: Optional description, rendered into the metadata block.
        transcripts: Transcript key -> `Transcript`; at least one. A list is accepted too, keyed
            by each transcript's id (Docent's later shape).
        metadata: A `BaseAgentRunMetadata` (or subclass) with the required `scores`. A dict is
            accepted and validated into `BaseAgentRunMetadata` (Docent's seed rejected dicts).

    Raises:
        pydantic.ValidationError: no transcript, no `scores`, or a field of the wrong type.
    """

    id: str = Field(default_factory=lambda: str(uuid4()))
    name: str | None = None
    description: str | None = None
    transcripts: dict[str, Transcript]
    metadata: BaseAgentRunMetadata

    @field_validator("transcripts", mode="before")
    @classmethod
    def _key_transcript_lists(cls, value: Any) -> Any:
        if isinstance(value, list):
            transcripts = [Transcript.model_validate(t) for t in value]
            return {t.id: t for t in transcripts}
        return value

    @model_validator(mode="after")
    def _require_a_transcript(self) -> AgentRun:
        if not self.transcripts:
            raise ValueError("AgentRun must have at least one transcript")
        return self

    @field_serializer("metadata")
    def serialize_metadata(self, metadata: BaseAgentRunMetadata, _info: Any) -> dict[str, Any]:
        """Dump metadata with its subclass fields (pydantic would dump only the declared type's)."""
        return metadata.model_dump(strip_internal_fields=False)

    @property
    def text(self) -> str:
        """The run rendered for an LLM: every transcript, then the run's metadata (YAML).

        Byte-identical to Docent's seed-era `AgentRun.text` for runs without multiple reasoning
        parts per message.
        """
        return render_text(self)

    def to_text(self, token_limit: int = sys.maxsize) -> list[str]:
        """The run rendered as chunks of at most `token_limit` cl100k_base tokens each.

        As Docent's seed-era `AgentRun.to_text`: `[self.text]` when it fits (or with the default
        limit); otherwise chunks that start "Here is a partial agent run...", cut along transcript
        boundaries, then units of action, then inside a unit too long for a chunk. Unlike Docent,
        no content is ever dropped (an over-long unit continues in numbered parts in the next
        chunks), every block keeps its own transcript index, and text holding special-token
        strings such as `<|endoftext|>` does not raise. The tokenizer runs offline.

        Raises:
            ValueError: `token_limit` is below 128, or leaves no room beside the chunk headers.
        """
        return split_run_text(self, token_limit)

    def metadata_block(self) -> str:
        """The run's metadata, with `name` and `description`, as an `<agent run metadata>` block.

        Keys with a description render as `key (description)`, sorted, in YAML, as in Docent.
        """
        data = self.metadata.model_dump(strip_internal_fields=True)
        if self.name is not None:
            data["name"] = self.name
        if self.description is not None:
            data["description"] = self.description
        metadata = render_yaml(data, self.metadata)
        return f"<agent run metadata>\n{metadata}\n</agent run metadata>"

    def model_dump(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Dump like pydantic, plus the rendered `text` (as Docent's seed does)."""
        return super().model_dump(*args, **kwargs) | {"text": self.text}

    def get_filterable_fields(self, max_depth: int = 1) -> list[FilterableField]:
        """List `metadata.*` paths holding str, bool, int or float values, then `text`.

        Dicts are explored down to `max_depth` levels below `metadata`; lists and None are skipped.
        """
        fields: list[FilterableField] = []

        def walk(data: dict[str, Any], prefix: str, depth: int) -> None:
            if depth > max_depth:
                return
            for key, value in data.items():
                if isinstance(value, str | bool | int | float):
                    fields.append({"name": f"{prefix}.{key}", "type": type(value).__name__})  # type: ignore[typeddict-item]
                elif isinstance(value, dict):
                    walk(value, f"{prefix}.{key}", depth + 1)

        walk(self.metadata.model_dump(strip_internal_fields=True), "metadata", 0)
        fields.append({"name": "text", "type": "str"})
        return fields


class AgentRunWithoutMetadataValidator(AgentRun):
    """Kept for Docent compatibility: `AgentRun` itself now accepts JSON-dumped metadata dicts."""
