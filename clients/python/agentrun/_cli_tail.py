"""`agentrun tail RUN_ID`: a live run's messages as they land, until it finishes; a run uploaded
whole (no events) is printed whole, its messages numbered in order within each transcript.

Plain lines when piped (`[3] main assistant: ...`, one per message, stable for scripts); on a
terminal the same lines drawn with rich: role in colour, the message's own timestamp when it has
one. Run content is never read as markup, and control characters are escaped either way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from agentrun._client import Client
from agentrun._connection import connection_from_arguments
from agentrun._terminal import safe_text
from agentrun.chat import ChatMessage, ContentText

_ROLE_STYLES = {"system": "magenta", "user": "cyan", "assistant": "green", "tool": "yellow"}


def add_tail_command(commands: Any, add_server: Callable[[argparse.ArgumentParser], None]) -> None:
    tail = commands.add_parser(
        "tail",
        help="print a live run's messages as they land, until it finishes",
        description="Follow a live run: each new message is printed as it is stored (after the "
        "ones already there), with its event number, transcript and role (and, on a terminal, "
        "its timestamp); the command ends when the run finishes (Ctrl-C stops it sooner). A run "
        "uploaded whole is printed whole, its messages numbered within each transcript.",
    )
    tail.add_argument("agent_run_id", metavar="RUN_ID")
    tail.add_argument(
        "--after", type=int, default=0, metavar="N", help="start after event N [default: 0]"
    )
    add_server(tail)


def message_text(message: ChatMessage) -> str:
    """A message's visible text; parts that are not text shown as `[kind]`."""
    if isinstance(message.content, str):
        return message.content
    return "".join(
        part.text if isinstance(part, ContentText) else f"[{part.type}]" for part in message.content
    )


def run_tail_command(args: argparse.Namespace) -> int:
    show = _Rich() if sys.stdout.isatty() else _Plain()
    last = None
    printed = False
    with Client(connection=connection_from_arguments(args)) as client:
        for update in client.watch_run(args.agent_run_id, args.after):
            for event in update.events:
                printed = True
                for key, message in event.messages:
                    show.message(event.sequence, key, message)
                for name, score in event.scores.items():
                    show.line(f"[{event.sequence}] score {safe_text(name)} = {score}")
            if update.state == "finished" and not printed and args.after == 0:
                _print_whole(client, args.agent_run_id, show)  # uploaded whole: no events
            if update.state != last:
                show.line(f"-- run {safe_text(args.agent_run_id)} is {update.state}", style="bold")
                last = update.state
    return 0


def _print_whole(client: Client, run_id: str, show: _Plain) -> None:
    run = client.get_run(run_id)
    for key, transcript in run.transcripts.items():
        for number, message in enumerate(transcript.messages, 1):
            show.message(number, key, message)
    for name, score in run.metadata.scores.items():
        show.line(f"score {safe_text(name)} = {score}")


class _Plain:
    def message(self, sequence: int, key: str, message: ChatMessage) -> None:
        text = safe_text(message_text(message), keep_newlines=True)
        role = message.role
        self.line(f"[{sequence}] {safe_text(key)} {role}: {text}")

    def line(self, text: str, style: str = "") -> None:
        print(text, flush=True)


class _Rich(_Plain):
    def __init__(self) -> None:
        self._console = Console(highlight=False, soft_wrap=True)

    def message(self, sequence: int, key: str, message: ChatMessage) -> None:
        role = message.role
        line = Text.assemble((f"[{sequence}] ", "dim"))
        if message.timestamp is not None:
            made = message.timestamp.astimezone()
            line.append(made.strftime("%H:%M:%S "), style="dim")
        line.append(f"{safe_text(key)} ", style="bold")
        line.append(f"{role}: ", style=_ROLE_STYLES.get(role, ""))
        line.append(safe_text(message_text(message), keep_newlines=True))
        self._console.print(line)

    def line(self, text: str, style: str = "") -> None:
        self._console.print(Text(text, style=style))
