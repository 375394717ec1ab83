"""`from agentrun.data_models import AgentRun, Transcript, BaseAgentRunMetadata`: Docent's import
paths (`docent.data_models`, `.agent_run`, `.transcript`, `.metadata`, `.chat`), for code ported by
renaming `docent` to `agentrun`. The names are agentrun's own: `agentrun.AgentRun` is the same
class."""

from __future__ import annotations

from agentrun._agent_run import AgentRun, AgentRunWithoutMetadataValidator
from agentrun._metadata import BaseAgentRunMetadata, BaseMetadata
from agentrun._transcript import Transcript

__all__ = [
    "AgentRun",
    "AgentRunWithoutMetadataValidator",
    "BaseAgentRunMetadata",
    "BaseMetadata",
    "Transcript",
]
