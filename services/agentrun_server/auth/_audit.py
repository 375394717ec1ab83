"""Audit lines: one structured log line per admin action, naming the key and what it touched."""

from __future__ import annotations

import json
import logging
from typing import Any

from agentrun_server.auth._principal import caller

audit_log = logging.getLogger("agentrun.audit")
"""Where the lines go (INFO): route this logger to its own file or sink to keep them apart."""


def audit(action: str, **touched: Any) -> None:
    """Log `action` by the calling key (`"-"` when auth is off) as one JSON object, e.g.
    `{"audit": "tasks.cancel", "key": "ops", "workflow": "grading", "count": 3}`."""
    if audit_log.isEnabledFor(logging.INFO):
        line = {"audit": action, "key": caller().name or "-", **touched}
        audit_log.info("%s", json.dumps(line, separators=(", ", ": "), default=str))
