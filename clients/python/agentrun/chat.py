"""Chat messages, content parts and tool calls, as in Docent's `docent.data_models.chat`.

A transcript is a list of `ChatMessage`: a `SystemMessage`, `UserMessage`, `AssistantMessage`
(possibly with `tool_calls`) or `ToolMessage`, told apart by `role`. Content is a string or a list
of `ContentText` / `ContentReasoning` parts.

Differences from Docent: `ToolCall` is a pydantic model (keyword arguments; `type` is optional, as in
Docent's later releases), an empty `tool_calls` or `tool_call_id` list is stored as None, and a
message may carry a `timestamp` (when the agent made it; kept on the wire, not rendered).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, TypeAdapter, field_validator

__all__ = [
    "AssistantMessage",
    "ChatMessage",
    "Content",
    "ContentReasoning",
    "ContentText",
    "SystemMessage",
    "ToolCall",
    "ToolCallContent",
    "ToolMessage",
    "UserMessage",
    "parse_chat_message",
]


class ContentText(BaseModel):
    """A text part of a message's content."""

    type: Literal["text"] = "text"
    text: str
    refusal: bool | None = None


class ContentReasoning(BaseModel):
    """A reasoning (chain-of-thought) part of an assistant message's content."""

    type: Literal["reasoning"] = "reasoning"
    reasoning: str
    signature: str | None = None
    redacted: bool = False


Content = Annotated[ContentText | ContentReasoning, Discriminator("type")]


class ToolCallContent(BaseModel):
    """A custom rendering of a tool call; `.text` shows `content` instead of `function(args)`."""

    title: str | None = None
    format: Literal["text", "markdown"]
    content: str


class ToolCall(BaseModel):
    """A tool call made by an assistant message."""

    id: str
    function: str
    arguments: dict[str, Any]
    type: Literal["function"] | None = None
    parse_error: str | None = None
    view: ToolCallContent | None = None


class BaseChatMessage(BaseModel):
    """Fields common to every chat message."""

    id: str | None = None
    content: str | list[Content]
    role: Literal["system", "user", "assistant", "tool"]
    timestamp: datetime | None = None
    """When the message was made (optional), held in UTC (a time without a zone is taken as
    UTC; one with a zone is converted, as on the wire). Kept to microseconds; not in `.text`."""

    @field_validator("timestamp")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    @property
    def text(self) -> str:
        """The message's visible text: the string content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, ContentText))


class SystemMessage(BaseChatMessage):
    """A system prompt."""

    role: Literal["system"] = "system"


class UserMessage(BaseChatMessage):
    """A user turn; `tool_call_id` lists the tool calls it answers, if any."""

    role: Literal["user"] = "user"
    tool_call_id: list[str] | None = None

    @field_validator("tool_call_id")
    @classmethod
    def _empty_is_none(cls, value: list[str] | None) -> list[str] | None:
        return value or None


class AssistantMessage(BaseChatMessage):
    """An assistant turn, with the producing `model` and its `tool_calls`, if any."""

    role: Literal["assistant"] = "assistant"
    model: str | None = None
    tool_calls: list[ToolCall] | None = None

    @field_validator("tool_calls")
    @classmethod
    def _empty_is_none(cls, value: list[ToolCall] | None) -> list[ToolCall] | None:
        return value or None


class ToolMessage(BaseChatMessage):
    """The result of a tool call: `tool_call_id` and `function` name the call; `error` if it failed."""

    role: Literal["tool"] = "tool"
    tool_call_id: str | None = None
    function: str | None = None
    error: dict[str, Any] | None = None


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Discriminator("role")
]

_chat_message_adapter: TypeAdapter[SystemMessage | UserMessage | AssistantMessage | ToolMessage] = (
    TypeAdapter(ChatMessage)
)


def parse_chat_message(
    message: dict[str, Any] | BaseChatMessage,
) -> SystemMessage | UserMessage | AssistantMessage | ToolMessage:
    """Return `message` as a typed chat message, dispatching a dict on its `role`.

    Raises:
        ValueError: the role is missing or unknown.
        pydantic.ValidationError: the fields do not fit the role's message class.
    """
    if isinstance(message, SystemMessage | UserMessage | AssistantMessage | ToolMessage):
        return message
    if isinstance(message, BaseChatMessage):
        message = message.model_dump()
    role = message.get("role")
    if role not in ("system", "user", "assistant", "tool"):
        raise ValueError(f"Unknown message role: {role!r}")
    return _chat_message_adapter.validate_python(message)
