"""`agentrun tail RUN_ID`: a live run's messages as they land, until it finishes.

Plain lines when piped (`[3] main assistant: ...`, one per message, stable for scripts); on a
terminal the same lines drawn with rich: role in colour, the message's own timestamp when it has
one. Run content is never read as markup, and control characters are escaped either way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC
from typing import Any

from rich.console import Console
from rich.text import Text

from agentrun._client import Client
from agentrun._connection import connection_from_arguments
from agentrun._terminal import safe_text
from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as pb

_STATES = {v: k.removeprefix("AGENT_RUN_STATE_").lower() for k, v in pb.AgentRunState.items()}
_ROLE_STYLES = {"system": "magenta", "user": "cyan", "assistant": "green", "tool": "yellow"}


def add_tail_command(commands: Any, add_server: Callable[[argparse.ArgumentParser], None]) -> None:
    tail = commands.add_parser(
        "tail",
        help="print a live run's messages as they land, until it finishes",
        description="Follow a live run: each new message is printed as it is stored (after the "
        "ones already there), with its event number, transcript and role (and, on a terminal, "
        "its timestamp); the command ends when the run finishes (Ctrl-C stops it sooner).",
    )
    tail.add_argument("agent_run_id", metavar="RUN_ID")
    tail.add_argument(
        "--after", type=int, default=0, metavar="N", help="start after event N [default: 0]"
    )
    add_server(tail)


def message_text(message: run_pb.ChatMessage) -> str:
    """A message's visible text; non-text parts shown as `[kind]`."""
    if message.WhichOneof("content") == "parts":
        return "".join(
            part.text.text if part.WhichOneof("kind") == "text" else f"[{part.WhichOneof('kind')}]"
            for part in message.parts.parts
        )
    return message.text


def run_tail_command(args: argparse.Namespace) -> int:
    show = _Rich() if sys.stdout.isatty() else _Plain()
    last = None
    with Client(connection=connection_from_arguments(args)) as client:
        for response in client.watch_run(args.agent_run_id, args.after):
            for event in response.events:
                for transcript in event.patch.transcripts:
                    for message in transcript.messages:
                        show.message(event.sequence, transcript.key, message)
                for key, score in event.patch.scores.items():
                    value = getattr(score, score.WhichOneof("kind") or "double_value")
                    show.line(f"[{event.sequence}] score {safe_text(key)} = {value}")
            state = _STATES.get(response.state, "?")
            if state != last:
                show.line(f"-- run {safe_text(args.agent_run_id)} is {state}", style="bold")
                last = state
    return 0


class _Plain:
    def message(self, sequence: int, key: str, message: run_pb.ChatMessage) -> None:
        role = message.WhichOneof("role") or "?"
        text = safe_text(message_text(message), keep_newlines=True)
        self.line(f"[{sequence}] {safe_text(key)} {role}: {text}")

    def line(self, text: str, style: str = "") -> None:
        print(text, flush=True)


class _Rich(_Plain):
    def __init__(self) -> None:
        self._console = Console(highlight=False, soft_wrap=True)

    def message(self, sequence: int, key: str, message: run_pb.ChatMessage) -> None:
        role = message.WhichOneof("role") or "?"
        line = Text.assemble((f"[{sequence}] ", "dim"))
        if message.HasField("timestamp"):
            made = message.timestamp.ToDatetime(tzinfo=UTC).astimezone()
            line.append(made.strftime("%H:%M:%S "), style="dim")
        line.append(f"{safe_text(key)} ", style="bold")
        line.append(f"{role}: ", style=_ROLE_STYLES.get(role, ""))
        line.append(safe_text(message_text(message), keep_newlines=True))
        self._console.print(line)

    def line(self, text: str, style: str = "") -> None:
        self._console.print(Text(text, style=style))
