"""`docent.data_models.metadata`'s import path (see `agentrun.data_models`)."""

from __future__ import annotations

from agentrun._metadata import BaseAgentRunMetadata, BaseMetadata

__all__ = ["BaseAgentRunMetadata", "BaseMetadata"]
