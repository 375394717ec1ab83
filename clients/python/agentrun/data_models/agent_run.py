"""`docent.data_models.agent_run`'s import path (see `agentrun.data_models`)."""

from __future__ import annotations

from agentrun._agent_run import AgentRun, AgentRunWithoutMetadataValidator

__all__ = ["AgentRun", "AgentRunWithoutMetadataValidator"]
