"""`from agentrun.agent_run_writer import AgentRunWriter`: the import path of Docent's docs
(`docent.agent_run_writer`), for code moving over with its imports renamed."""

from __future__ import annotations

from agentrun._writer import AgentRunWriter, RejectedRun, WriteSummary, init

__all__ = ["AgentRunWriter", "RejectedRun", "WriteSummary", "init"]
