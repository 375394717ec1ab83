"""The storage contract for live run events: a resend of an event under its sequence number is a
duplicate only when it is the same event (issue 23)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from agentrun_server._errors import Aborted
from agentrun_server.storage import (
    EventStatus,
    Facet,
    Folded,
    NewEvent,
    RunFilter,
    RunQuery,
    Storage,
    event_digest,
)


def _fold(run_id: str, parts: Sequence[bytes]) -> Folded:
    return Folded(b"".join(parts), None, (Facet("scores.parts", float(len(parts)), None),))


def _event(sequence: int, patch: bytes, collection: str, finish: bool = False) -> NewEvent:
    return NewEvent("live", sequence, collection, patch, finish, event_digest(patch, finish))


async def _append(storage: Storage, *events: NewEvent):
    return await storage.append_events(list(events), _fold, 1 << 20, 1.0)


async def test_a_resend_is_a_duplicate_and_another_event_under_its_number_is_refused(
    storage: Storage,
) -> None:
    collection, _ = await storage.create_collection("c", "", "", 1.0)
    stored = await _append(
        storage, *(_event(n, f"step {n}".encode(), collection.id) for n in (1, 2, 3))
    )
    assert [o.status for o in stored] == [EventStatus.STORED] * 3
    resent, other, after_other = await _append(
        storage,
        _event(2, b"step 2", collection.id),
        _event(2, b"another writer's step 2", collection.id),
        _event(4, b"step 4", collection.id),
    )
    assert (resent.status, resent.next_sequence) == (EventStatus.DUPLICATE, 4)
    assert (other.status, other.next_sequence) == (EventStatus.REFUSED, 4)
    assert isinstance(other.error, Aborted)
    assert "sequence: 2" in str(other.error) and "continues at 4" in str(other.error)
    assert after_other.status is EventStatus.STORED  # the refusal stores nothing, breaks nothing
    _, events = await storage.events_after("live", 0, 10)
    assert [data for _, data in events] == [b"step 1", b"step 2", b"step 3", b"step 4"]
    # The finishing event differs from the same patch not finishing: not a duplicate of it.
    finished = await _append(storage, _event(5, b"end", collection.id, finish=True))
    assert finished[0].status is EventStatus.STORED
    same, unfinished = await _append(
        storage,
        _event(5, b"end", collection.id, finish=True),
        _event(5, b"end", collection.id, finish=False),
    )
    assert same.status is EventStatus.DUPLICATE
    assert unfinished.status is EventStatus.REFUSED and isinstance(unfinished.error, Aborted)


async def test_events_stored_before_digests_are_compared_by_their_content(
    storage: Storage,
) -> None:
    """Events written before the digest column (NULL) are judged by their stored patch."""
    collection, _ = await storage.create_collection("c", "", "", 1.0)
    await _append(storage, _event(1, b"old step", collection.id))
    await _forget_digests(storage)
    same, other = await _append(
        storage, _event(1, b"old step", collection.id), _event(1, b"new step", collection.id)
    )
    assert same.status is EventStatus.DUPLICATE
    assert other.status is EventStatus.REFUSED and isinstance(other.error, Aborted)


async def _forget_digests(storage: Storage) -> None:
    sqlite_path = getattr(storage, "path", None)
    if sqlite_path is not None:
        import sqlite3

        with sqlite3.connect(sqlite_path) as db:
            db.execute("UPDATE agent_run_events SET digest = NULL")
        return
    url = getattr(storage, "url", None)
    if url is None:
        pytest.skip("a backend this test does not know how to rewind")
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("UPDATE agent_run_events SET digest = NULL")


async def test_a_live_run_is_found_by_its_facets_once_it_finishes(storage: Storage) -> None:
    collection, _ = await storage.create_collection("c", "", "", 1.0)
    query = RunQuery(collection.id, filters=(RunFilter("scores.parts", "=", 2.0, None),))
    await _append(storage, _event(1, b"a", collection.id))
    assert await storage.list_runs(query, 0, 10) == ([], False)  # running: no facets yet
    await _append(storage, _event(2, b"b", collection.id, finish=True))
    page, _ = await storage.list_runs(query, 0, 10)
    assert [r.id for r in page] == ["live"]


async def test_live_runs_are_counted_per_collection_running_or_abandoned(storage: Storage) -> None:
    a, _ = await storage.create_collection("a", "", "", 1.0)
    b, _ = await storage.create_collection("b", "", "", 1.0)
    quiet, busy, done = (
        NewEvent(run, 1, b.id, b"x", False, event_digest(b"x", False))
        for run in ("quiet", "busy", "done")
    )
    await storage.append_events([quiet], _fold, 1 << 20, 10.0)
    await storage.append_events([busy, _event(1, b"x", a.id)], _fold, 1 << 20, 50.0)
    await storage.append_events([done], _fold, 1 << 20, 50.0)
    finish = NewEvent("done", 2, b.id, b"y", True, event_digest(b"y", True))
    await storage.append_events([finish], _fold, 1 << 20, 50.0)
    counts = await storage.count_live_runs(abandoned_before=30.0)
    assert counts == {a.id: (1, 0), b.id: (1, 1)}  # b: busy running, quiet abandoned; done not


async def test_a_page_of_events_stops_at_its_byte_budget(storage: Storage) -> None:
    collection, _ = await storage.create_collection("c", "", "", 1.0)
    sizes = [400, 400, 1000, 10, 10]
    await _append(
        storage, *(_event(n + 1, b"x" * size, collection.id) for n, size in enumerate(sizes))
    )
    pages, after = [], 0
    while True:
        _, events = await storage.events_after("live", after, 10, max_bytes=900)
        if not events:
            break
        pages.append([len(data) for _, data in events])
        after = events[-1][0]
    assert pages == [[400, 400], [1000], [10, 10]]  # a bigger event alone, never skipped
    _, all_of_them = await storage.events_after("live", 0, 10)
    assert len(all_of_them) == 5
