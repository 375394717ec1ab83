"""The writer's spool on real files: segments round-trip, settle, lock, and survive bad neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentrun._errors import SpoolError
from agentrun._spool import Spool


def test_segments_replay_in_order_until_settled(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.append(b"collection-a", [b"run-1", b"", b"x" * 300])
    spool.append(b"collection-b", [b"run-4"])
    assert (spool.runs, spool.bytes) == (4, first.size + 5)
    spool.settle(first, 2)
    assert first.path.exists()  # one run of it still unacknowledged
    spool.close()

    again = Spool(tmp_path)
    replayed = [(collection, runs) for _, collection, runs in again.replay()]
    assert replayed == [
        (b"collection-a", [b"run-1", b"", b"x" * 300]),  # a segment replays whole
        (b"collection-b", [b"run-4"]),
    ]
    for segment, _, runs in list(again.replay()):
        again.settle(segment, len(runs))
    assert not list(tmp_path.glob("*.seg"))
    # New segments never reuse the name of one that was there.
    assert again.append(b"c", [b"r"]).path.name > first.path.name
    again.close()


def test_a_second_writer_cannot_take_a_held_spool(tmp_path: Path) -> None:
    held = Spool(tmp_path)
    with pytest.raises(SpoolError, match="held by another writer"):
        Spool(tmp_path)
    held.close()
    Spool(tmp_path).close()  # free again


def test_a_torn_write_is_dropped_and_a_corrupt_segment_set_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    good = spool.append(b"c", [b"kept"])
    spool.close()
    (tmp_path / "00000000000000000007.tmp").write_bytes(b"cut off before its rename")
    bad = tmp_path / "00000000000000000005.seg"
    bad.write_bytes(b"agentrun-spool-1\n\x01c\x09short")  # a record longer than the file

    spool = Spool(tmp_path)
    assert [runs for _, _, runs in spool.replay()] == [[b"kept"]]
    assert not bad.exists() and bad.with_suffix(".bad").exists()
    (damage,) = spool.damage
    assert "torn after 0 runs" in damage and "00000000000000000005.bad" in damage
    assert not list(tmp_path.glob("*.tmp"))
    assert good.path.exists()
    spool.close()


def test_a_summary_prints_as_a_few_lines_however_many_runs_were_rejected() -> None:
    from agentrun import RejectedRun, WriteSummary

    summary = WriteSummary(
        accepted=5,
        rejected=[RejectedRun(f"r{i}", "INVALID", "x" * 10_000) for i in range(1000)],
        undelivered=2,
    )
    text = str(summary)
    assert text.splitlines()[0] == (
        "WriteSummary: 5 accepted, 0 duplicates, 1000 rejected, 2 undelivered (0 spooled), "
        "0 replayed"
    )
    assert len(text.splitlines()) == 5 and "... and 997 more rejected" in text
    assert len(text) < 1000


def test_a_summary_of_live_run_events_prints_as_a_few_lines_too() -> None:
    from agentrun import RefusedEvent, WriteSummary

    assert "live run events" not in str(WriteSummary(accepted=1))
    undelivered = WriteSummary(events_undelivered=4, events_spooled=4)
    assert not undelivered.ok
    assert "live run events: 0 stored, 0 duplicates, 0 refused, 4 undelivered (4 spooled)" in str(
        undelivered
    )
    refused = WriteSummary(
        events_stored=10,
        events_refused=[
            RefusedEvent("r", i, "FAILED_PRECONDITION", "y" * 10_000) for i in range(100)
        ],
    )
    text = str(refused)
    assert not refused.ok
    assert "refused event r#0: FAILED_PRECONDITION: " in text
    assert "... and 97 more refused events" in text and len(text) < 1200
