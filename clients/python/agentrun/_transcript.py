"""`Transcript` and its text rendering, as in Docent's seed-era `docent.data_models.transcript`.

Rendering differs from Docent's only where Docent loses content: units of action are computed from
the current messages (Docent caches them at construction, so appended messages vanish), every
reasoning part is shown (Docent keeps the last), and unit 0 can be highlighted.
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import yaml
from pydantic import BaseModel, Field, field_serializer

from agentrun._metadata import BaseMetadata
from agentrun.chat import AssistantMessage, ChatMessage, ContentReasoning


def render_yaml(data: dict[str, Any], metadata: BaseMetadata) -> str:
    """Render metadata as Docent does: keys with a description become `key (description)`."""
    labelled = {}
    for key, value in data.items():
        description = metadata.get_field_description(key)
        labelled[f"{key} ({description})" if description else key] = value
    return yaml.dump(labelled, width=float("inf"))


def format_chat_message(
    message: ChatMessage, block_idx: int, transcript_idx: int = 0, agent_run_idx: int | None = None
) -> str:
    """Render one message as a `<T{t}B{b} | role: ...>` block, tool calls and reasoning included."""
    label = f"T{transcript_idx}B{block_idx}"
    if agent_run_idx is not None:
        label = f"R{agent_run_idx}{label}"
    body = ""
    if isinstance(message, AssistantMessage) and isinstance(message.content, list):
        for part in message.content:
            if isinstance(part, ContentReasoning):
                body += f"<reasoning>\n{part.reasoning}\n</reasoning>\n"
    body += message.text
    if isinstance(message, AssistantMessage) and message.tool_calls:
        for call in message.tool_calls:
            if call.view is not None:
                body += f"\n<tool call>\n{call.view.content}\n</tool call>"
            else:
                args = ", ".join(f"{key}={value}" for key, value in call.arguments.items())
                body += f"\n<tool call>\n{call.function}({args})\n</tool call>"
    return f"<{label} | role: {message.role}>\n{body}\n</{label}>"


def units_of_action(messages: list[ChatMessage]) -> list[list[int]]:
    """Group message indices into units of action (a system prompt; a user turn and its answers)."""
    units: list[list[int]] = []
    current: list[int] = []

    def flush() -> None:
        nonlocal current
        if current:
            units.append(current)
            current = []

    for i, message in enumerate(messages):
        previous = messages[i - 1].role if i > 0 else None
        if message.role == "system":
            flush()
            units.append([i])
        elif message.role == "user":
            if current and previous is not None and previous != "user":
                flush()
            current.append(i)
        elif message.role == "assistant":
            if current and previous not in ("user", "assistant"):
                flush()
            current.append(i)
        else:
            current.append(i)
    flush()
    return units


class Transcript(BaseModel):
    """One conversation of an agent run: messages plus transcript-level metadata."""

    id: str = Field(default_factory=lambda: str(uuid4()))
    name: str | None = None
    description: str | None = None
    messages: list[ChatMessage]
    metadata: BaseMetadata = Field(default_factory=BaseMetadata)

    @field_serializer("metadata")
    def serialize_metadata(self, metadata: BaseMetadata, _info: Any) -> dict[str, Any]:
        """Dump metadata with its subclass fields (pydantic would dump only the declared type's)."""
        return metadata.model_dump(strip_internal_fields=False)

    @property
    def units_of_action(self) -> list[list[int]]:
        """Message indices grouped into units of action, from the current messages."""
        return units_of_action(self.messages)

    def to_str(
        self,
        transcript_idx: int = 0,
        agent_run_idx: int | None = None,
        highlight_action_unit: int | None = None,
    ) -> str:
        """Render as `<blocks>` of action units followed by the transcript's `<metadata>`.

        Raises:
            ValueError: `highlight_action_unit` is not the index of a unit.
        """
        units = self.unit_blocks(transcript_idx, agent_run_idx)
        if highlight_action_unit is not None and not 0 <= highlight_action_unit < len(units):
            raise ValueError(f"Invalid action unit index: {highlight_action_unit}")
        rendered = []
        for k, blocks in enumerate(units):
            text = action_unit(k, "\n".join(blocks))
            if highlight_action_unit == k:
                text = f"<HIGHLIGHTED>\n{text}\n</HIGHLIGHTED>"
            rendered.append(text)
        return "<blocks>\n" + "\n".join(rendered) + "\n</blocks>\n" + self.metadata_block()

    def unit_blocks(
        self, transcript_idx: int = 0, agent_run_idx: int | None = None
    ) -> list[list[str]]:
        """Each unit of action as its rendered message blocks, in order."""
        return [
            [format_chat_message(self.messages[i], i, transcript_idx, agent_run_idx) for i in unit]
            for unit in self.units_of_action
        ]

    def metadata_block(self) -> str:
        """The transcript's metadata as a `<metadata>` YAML block."""
        metadata = render_yaml(self.metadata.model_dump(strip_internal_fields=True), self.metadata)
        return f"<metadata>\n{metadata}\n</metadata>"


def action_unit(k: int, body: str) -> str:
    """Wrap unit `k`'s rendered blocks in its `<action unit k>` tags."""
    return f"<action unit {k}>\n{body}\n</action unit {k}>"
