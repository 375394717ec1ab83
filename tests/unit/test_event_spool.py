"""The spool's live run event journal on real files: events replay in order until acknowledged,
files roll and are deleted as acks reach past them, and a torn log keeps its place in the order."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentrun import _event_spool
from agentrun._event_spool import EventJournal


def _events(n: int, start: int = 0) -> list[bytes]:
    return [f"event-{i}".encode() * (i % 3) for i in range(start, start + n)]


def test_unacknowledged_events_replay_in_order_and_settled_files_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_event_spool, "ROLL_BYTES", 40)  # a few events per file
    journal = EventJournal(tmp_path, fsync=False)
    made = _events(30)
    for event in made:
        journal.append(event)
    files = sorted(tmp_path.glob("events-*.log"))
    assert len(files) > 3
    assert journal.unsettled == 30
    journal.settle(12)
    assert journal.unsettled == 18
    left = sorted(tmp_path.glob("events-*.log"))
    assert files[0] not in left and len(left) < len(files)  # the files acks reached past
    journal.close()

    again = EventJournal(tmp_path, fsync=False)
    replayed = again.replay()
    # What is left starts at a file boundary at or before the first unacknowledged event.
    assert made[-len(replayed) :] == replayed and 18 <= len(replayed) < 30
    again.append(b"new")
    assert sorted(tmp_path.glob("events-*.log"))[-1].name > left[-1].name  # names never reused
    again.settle(len(replayed) + 1)
    again.close()
    assert not list(tmp_path.glob("events-*.log"))


def test_a_torn_log_keeps_its_whole_events_in_their_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_event_spool, "ROLL_BYTES", 60)
    journal = EventJournal(tmp_path, fsync=False)
    made = _events(12)
    for event in made:
        journal.append(event)
    journal.close()
    files = sorted(tmp_path.glob("events-*.log"))
    torn = files[1]
    data = torn.read_bytes()
    torn.write_bytes(data[:-3])  # a power loss took the end of its last event
    (tmp_path / "events-00000000000000000099.log").write_bytes(b"something else")

    again = EventJournal(tmp_path, fsync=False)
    replayed = again.replay()
    assert len(again.damage) == 2
    assert "torn after" in again.damage[0] and "not an event log" in again.damage[1]
    assert (tmp_path / torn.with_suffix(".bad").name).exists()
    lost = made.index(_event_spool.parse_log(data)[0][-1])
    assert replayed == made[:lost] + made[lost + 1 :]  # only the torn event, the rest in order
    again.close()
