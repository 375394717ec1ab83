"""`python -m agentrun_server serve|migrate ...`: the server's own entry point."""

from __future__ import annotations

import sys

from agentrun_server._cli import main

sys.exit(main(prog="python -m agentrun_server"))
