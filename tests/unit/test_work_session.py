"""The Work session, without I/O: credits within a window widened by settles, stage quotas, what
a settle frees, a stream that stops reading, revocations, and what goes to the worker."""

from __future__ import annotations

import asyncio

from agentrun_server.orchestrator._session import (
    UNLIMITED,
    Acked,
    Leased,
    Reconnect,
    Revoked,
    StagesEmpty,
    WorkSession,
)
from agentrun_server.storage import Ack, AckCode, LeasedTask, Revocation, StageDef, WorkflowDef

WORKFLOW = WorkflowDef("w", (StageDef("a", {"next": "b"}), StageDef("b")))


def _session(credits: int = 10, window: int = 4, key: str = "", **quota: int) -> WorkSession:
    return WorkSession(
        id="s1",
        key=key,
        window=window,
        worker="test",
        workflow=WORKFLOW,
        stage_quota={"a": quota.get("a", UNLIMITED), "b": quota.get("b", UNLIMITED)},
        credits=credits,
        lease_seconds=None,
        notify_when_empty=False,
        max_batch_bytes=1 << 20,
        outbox=asyncio.Queue(),
    )


def _task(n: int, stage: str = "a", size: int = 10) -> LeasedTask:
    return LeasedTask(n, f"lease-{n}", 1, 3, 100.0, stage, f"r{n}", "c", 0, None, 1.0, b"x" * size)


def _drained(session: WorkSession) -> list[object]:
    items = []
    while not session.outbox.empty():
        items.append(session.outbox.get_nowait())
    return items


def test_credits_stay_within_the_window_until_settles_widen_it() -> None:
    session = _session(credits=10, window=4)
    assert session.free_credits == 4  # a stream that never settles holds its window at most
    assert session.take([_task(1), _task(2), _task(3), _task(4)], now=5.0) == {"a": 4}
    assert session.free_credits == 0
    (batch,) = _drained(session)
    assert isinstance(batch, Leased) and len(batch.tasks) == 4
    acks = [Ack(1, "lease-1"), Ack(2, "lease-2")]
    session.on_settled("complete_tasks", acks)
    assert session.settled == 2 and session.free_credits == 4  # two freed, window two wider
    assert _drained(session) == [Acked(acks)]
    session.grant(100, max_credits=12)
    assert session.credits == 12


def test_what_a_settle_frees_and_what_it_keeps() -> None:
    session = _session()
    session.take([_task(1), _task(2), _task(3)], now=5.0)
    session.on_settled(
        "complete_tasks",
        [
            Ack(1, "lease-1"),
            Ack(2, "lease-2", AckCode.INVALID_ARGUMENT, "bad pathway"),  # lease kept
            Ack(3, "lease-3", AckCode.FAILED_PRECONDITION, "stale"),  # gone: credit freed
        ],
    )
    assert set(session.in_flight) == {"lease-2"} and session.settled == 1
    session.on_settled("extend_leases", [Ack(2, "lease-2", deadline=9.0)])
    assert set(session.in_flight) == {"lease-2"}  # an extension keeps the lease


def test_quotas_bytes_and_a_stream_that_stops_reading() -> None:
    session = _session(credits=10, window=100, a=2)
    session.max_leased_bytes = 25
    session.take([_task(1, size=10)], now=1.0)
    request = session.claim_request(limit=8, server_id="srv")
    assert request.stage_limits == {"a": 1, "b": 8} and request.max_bytes == 15
    session.take([_task(2, size=10), _task(3, "b", size=10)], now=1.0)
    assert session.stage_quota["a"] == 0 and session.free_credits == 0  # over its bytes
    assert session.backed_up and not session.hungry  # two batches not taken by its writer
    assert session.sent() is True  # one taken: it reads again
    assert session.sent() is False


def test_revocations_free_what_the_stream_held_and_tell_its_worker() -> None:
    session = _session(key="fleet")
    session.key_held = {}
    session.take([_task(1), _task(2)], now=1.0)
    assert session.key_held == {"fleet": 2}
    _drained(session)
    mine, other = Revocation(1, "lease-1", "s1", "cancelled"), Revocation(9, "x", "s1", "expired")
    assert session.revoke([mine, other]) == [mine]
    assert _drained(session) == [Revoked([mine])]
    assert session.key_held == {"fleet": 1} and session.settled == 0  # not a settle
    session.empty()
    session.ask_to_reconnect()
    assert _drained(session) == [StagesEmpty(), Reconnect()]
    assert session.draining and session.reconnecting and session.empty_sent


def test_competing_and_covering_sessions() -> None:
    both = _session()
    only_b = _session()
    only_b.stage_quota = {"b": UNLIMITED}
    assert both.competes_with(only_b) and only_b.competes_with(both)
    assert both.covers(only_b) and not only_b.covers(both)
