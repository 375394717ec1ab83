"""`docent.data_models.transcript`'s import path (see `agentrun.data_models`)."""

from __future__ import annotations

from agentrun._transcript import Transcript

__all__ = ["Transcript"]
