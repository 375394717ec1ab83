"""The Runner's live progress per stage and its closing summary, drawn with rich on stderr.

Live progress shows only on a terminal; elsewhere (CI, a log file) the summary is printed as plain
text and progress goes to the log every `--refresh-every` seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from agentrun._runner import RunSummary


def _table(stages: list[str], summary: RunSummary, in_flight: Mapping[str, int]) -> Table:
    table = Table(title="agentrun runner", title_justify="left", expand=False)
    for column in ("stage", "running", "done", "by pathway", "failed", "dead", "handed back"):
        table.add_column(column, justify="left" if column in ("stage", "by pathway") else "right")
    for stage in stages:
        pathways = {p: n for (s, p), n in summary.completed.items() if s == stage}
        table.add_row(
            stage,
            str(in_flight.get(stage, 0)),
            str(sum(pathways.values())),
            ", ".join(f"{p or '(end)'} {n}" for p, n in sorted(pathways.items())),
            str(summary.failed[stage]),
            str(summary.dead[stage]),
            str(summary.handed_back[stage]),
        )
    return table


class StageProgress:
    """A live table of a Runner's stages, drawn from its summary and held leases (terminals only).

    The Runner calls `refresh()` from its event loop a few times a second, so the table is read
    on the thread that changes it and settling a task costs nothing extra.
    """

    def __init__(self, stages: list[str], summary: RunSummary, held: Mapping[str, Any]) -> None:
        self.console = Console(stderr=True)
        self._live: Live | None = None
        self._stages = stages
        self._summary = summary
        self._held = held

    def _render(self) -> Table:
        running: dict[str, int] = {}
        for item in self._held.values():
            running[item.lease.stage] = running.get(item.lease.stage, 0) + 1
        return _table(self._stages, self._summary, running)

    def start(self) -> bool:
        """Start drawing; False (and nothing drawn) when stderr is not a terminal."""
        if not self.console.is_terminal:
            return False
        self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=True)
        self._live.start()
        return True

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def print_summary(summary: RunSummary) -> None:
    """Print what a Runner did: a table on a terminal, plain lines elsewhere (stderr)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        print(summary, file=sys.stderr)
        return
    stages = sorted(
        {s for s, _ in summary.completed}
        | set(summary.failed)
        | set(summary.dead)
        | set(summary.handed_back)
    )
    console.print(_table(stages, summary, {}))
