"""`docent.data_models.chat`'s import path: the messages of `agentrun.chat`."""

from __future__ import annotations

from agentrun.chat import *  # noqa: F403
from agentrun.chat import __all__ as __all__
