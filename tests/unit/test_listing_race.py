"""A listing page is empty only at its end. PostgreSQL reads each statement of a read at READ
COMMITTED, so the runs (or tasks) a page listed by size may have left the state asked for when
they are read; the fuzzer caught ListTasks answering INTERNAL (IndexError) on such an empty page
with more to come. The procedure reads on past them instead (a stand-in for the statements)."""

from __future__ import annotations

from typing import Any

from agentrun_server.storage import RunQuery, StoredRun
from agentrun_server.storage._procedures.runs import list_runs


class Vanishing:
    """Six runs; the first two read whole have left the listing by the time they are read."""

    def __init__(self) -> None:
        self.reads = 0

    async def run_sizes(self, query: RunQuery, after_seq: int, limit: int) -> list[tuple[int, int]]:
        return [(seq, 10) for seq in range(after_seq + 1, 7)][:limit]

    async def runs_through(self, query: RunQuery, after_seq: int, last_seq: int) -> list[StoredRun]:
        self.reads += 1
        if self.reads == 1:
            return []
        return [
            StoredRun(f"r{seq}", "c", 0.0, b"", seq) for seq in range(after_seq + 1, last_seq + 1)
        ]


async def test_a_page_whose_runs_all_left_meanwhile_reads_on() -> None:
    db: Any = Vanishing()
    page, more = await list_runs(db, RunQuery("c"), 0, 2, None)
    assert [run.id for run in page] == ["r3", "r4"] and more
    page, more = await list_runs(db, RunQuery("c"), 4, 2, None)
    assert [run.id for run in page] == ["r5", "r6"] and not more
