"""One Work stream's session, with no I/O: its credits and window, the leases it holds, what a
settle frees, and what it has queued for its worker. The servicer feeds it the worker's messages;
the dispatcher asks it what it may claim and hands it what was claimed; neither keeps a ledger of
its own. What the session has to say to its worker goes to `outbox` as events (`Leased`,
`Acked`, `Revoked`, `StagesEmpty`, `Reconnect`), which the servicer writes as protobuf
(`_wire.py`): nothing here knows the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from agentrun_server.storage import (
    Ack,
    AckCode,
    ClaimRequest,
    LeasedTask,
    LeaseHolder,
    Revocation,
    WorkflowDef,
)

UNLIMITED = 2**31 - 1
MAX_UNSENT = 2
"""Lease batches that may wait for a stream's writer: one more, and the stream is backed up (it
reads nothing), so it is leased nothing until it reads again."""


class Leased(NamedTuple):
    """Leases claimed for the session, to push to its worker."""

    tasks: list[LeasedTask]


class Acked(NamedTuple):
    """The answers to one settle message, in order."""

    acks: list[Ack]


class Revoked(NamedTuple):
    """Leases taken back from the worker (cancelled, expired): it must stop those tasks."""

    leases: list[Revocation]


class StagesEmpty(NamedTuple):
    """Nothing is left for the worker (it asked to be told: `notify_when_empty`)."""


class Reconnect(NamedTuple):
    """The server is shutting down: the worker closes this stream and resumes on another."""


Event = Leased | Acked | Revoked | StagesEmpty | Reconnect
"""What a session says to its worker."""


@dataclass(eq=False)
class WorkSession:
    """One open Work stream.

    Credits: the worker's `credits` (plus grants, up to the stream's maximum), within a window
    of `window` leases beyond those it has settled, and within `max_leased_bytes`; all the
    sessions of one API key share `key_held`.
    """

    id: str
    key: str
    """The API key it was opened with ("" when the server checks none)."""
    window: int
    """Fairness: it holds at most this many leases beyond those it has settled (`settled`)."""
    worker: str
    workflow: WorkflowDef
    stage_quota: dict[str, int]
    """Stage -> tasks still allowed on this stream (UNLIMITED when uncapped)."""
    credits: int
    lease_seconds: float | None
    notify_when_empty: bool
    max_batch_bytes: int
    """Most encoded bytes one lease batch carries (the first lease goes regardless)."""
    outbox: asyncio.Queue[Event | BaseException | None] = field(default_factory=asyncio.Queue)
    """What to send the worker: events; an error to end the stream with; None: the end."""
    max_leased_bytes: int = 2**62
    """Most encoded bytes of unsettled leases this stream may hold: above it, no more leases."""
    in_flight: dict[str, float] = field(default_factory=dict)
    """Lease id -> when it was pushed (or resumed), for leases not yet settled: they hold the
    credits. Change it through `hold` and `drop`, which keep `held_bytes`."""
    lease_bytes: dict[str, int] = field(default_factory=dict)
    """Lease id -> the encoded bytes it carried, for leases in `in_flight` pushed here."""
    held_bytes: int = 0
    draining: bool = False
    reconnecting: bool = False
    """Asked to reconnect (the server is shutting down): its close detaches, never hands back."""
    closed: bool = False
    empty_sent: bool = False
    claiming: bool = False
    """A claim for this session is in storage: no second one may count the same credits."""
    settled: int = 0
    """Leases it held and settled itself (not revoked): each widens its window by one."""
    unsent: int = 0
    """Lease batches queued for it and not yet taken by its stream's writer: while MAX_UNSENT
    wait, the stream is not reading, and it is leased nothing more (they would pile up here)."""
    key_held: dict[str, int] = field(default_factory=dict)
    """Leases held per API key, over every session of the dispatcher (shared)."""
    starved: bool = False
    """Its last claim found fewer ready tasks than it could take: tasks are scarce for it."""

    # --- what it may take ---------------------------------------------------------------------

    @property
    def free_credits(self) -> int:
        """Credits not held by a lease, within its window (none while the stream holds
        `max_leased_bytes`)."""
        if self.held_bytes >= self.max_leased_bytes:
            return 0
        allowed = min(self.credits, self.window + self.settled)
        return max(0, allowed - len(self.in_flight))

    @property
    def free_bytes(self) -> int:
        """Encoded bytes of leases this stream may still be sent."""
        return max(0, self.max_leased_bytes - self.held_bytes)

    @property
    def backed_up(self) -> bool:
        """Whether its stream is not reading what is sent (MAX_UNSENT batches wait)."""
        return self.unsent >= MAX_UNSENT

    @property
    def hungry(self) -> bool:
        """Whether it could take a lease now."""
        return not (self.closed or self.draining or self.backed_up) and self.free_credits > 0

    @property
    def uncapped(self) -> bool:
        """Whether no stage of it has a quota (a short claim then means the stages drained)."""
        return min(self.stage_quota.values()) == UNLIMITED

    def competes_with(self, other: WorkSession) -> bool:
        """Whether both serve one stage of one workflow (the same tasks could go to either)."""
        return self.workflow.name == other.workflow.name and not self.stage_quota.keys().isdisjoint(
            other.stage_quota
        )

    def covers(self, other: WorkSession) -> bool:
        """Whether it serves every stage `other` does (of one workflow)."""
        return self.workflow.name == other.workflow.name and (
            other.stage_quota.keys() <= self.stage_quota.keys()
        )

    @property
    def holder(self) -> LeaseHolder:
        """Who the session's leases are held by, as a task's history names them."""
        return LeaseHolder(self.worker, self.key, self.id)

    def claim_request(self, limit: int, server_id: str) -> ClaimRequest:
        """What a claim of up to `limit` tasks for this session asks of storage."""
        return ClaimRequest(
            self.id,
            self.workflow.name,
            {s: min(limit, n) for s, n in self.stage_quota.items()},
            limit,
            self.lease_seconds,
            max(1, min(self.max_batch_bytes, self.free_bytes)),
            server_id,
            self.worker,
            self.key,
        )

    # --- the worker's messages ----------------------------------------------------------------

    def grant(self, credits: int, max_credits: int) -> None:
        """More credits (`grant_credits`), cut to the stream's limit: a worker cannot take the
        backlog by granting."""
        self.credits = min(self.credits + credits, max_credits)

    def drain(self) -> None:
        """No new leases: the worker is shutting down (`drain`)."""
        self.draining = True

    def on_settled(self, kind: str, acks: Sequence[Ack]) -> None:
        """Free the credits of leases this stream no longer holds once a settle message of
        `kind` is answered; queue the answers for the worker."""
        for ack in acks:
            still_held = ack.code == AckCode.OK and kind == "extend_leases"
            # A refused pathway or output leaves the task leased: the worker can settle it again.
            still_held |= ack.code == AckCode.INVALID_ARGUMENT
            if not still_held:
                self.drop(ack.lease_id, settled=ack.code == AckCode.OK)
        self.outbox.put_nowait(Acked(list(acks)))

    # --- leases held --------------------------------------------------------------------------

    def hold(self, lease_id: str, now: float, size: int = 0) -> None:
        """Count a lease pushed (or resumed) on this stream as held."""
        if lease_id not in self.in_flight and self.key:
            self.key_held[self.key] = self.key_held.get(self.key, 0) + 1
        self.in_flight[lease_id] = now
        if size:
            self.lease_bytes[lease_id] = size
            self.held_bytes += size

    def drop(self, lease_id: str, settled: bool = False) -> float | None:
        """Stop counting a lease (`settled` by the worker, or revoked); when it was held, or None
        if it was not."""
        held_at = self.in_flight.pop(lease_id, None)
        size = self.lease_bytes.pop(lease_id, 0)
        self.held_bytes -= size
        if held_at is not None:
            self.settled += settled
            if self.key:
                left = self.key_held[self.key] - 1
                if left:
                    self.key_held[self.key] = left
                else:
                    del self.key_held[self.key]
        return held_at

    def take(self, tasks: list[LeasedTask], now: float) -> dict[str, int]:
        """Hold leases claimed for this stream and queue them for the worker; how many of each
        stage (for the metrics)."""
        per_stage: dict[str, int] = {}
        for task in tasks:
            self.hold(
                task.lease_id, now, len(task.run_data) + (len(task.input) if task.input else 0)
            )
            if self.stage_quota[task.stage] != UNLIMITED:
                self.stage_quota[task.stage] -= 1
            per_stage[task.stage] = per_stage.get(task.stage, 0) + 1
        self.empty_sent = False
        self.unsent += 1
        self.outbox.put_nowait(Leased(tasks))
        return per_stage

    def sent(self) -> bool:
        """A lease batch was taken by the stream's writer; whether the stream reads again (it was
        backed up, and is not)."""
        self.unsent -= 1
        return self.unsent == MAX_UNSENT - 1

    def revoke(self, revocations: Sequence[Revocation]) -> list[Revocation]:
        """Take back the leases of `revocations` this stream holds (their credits freed) and
        tell the worker; those it held."""
        held = [r for r in revocations if self.drop(r.lease_id) is not None]
        if held:
            self.outbox.put_nowait(Revoked(held))
        return held

    def empty(self) -> None:
        """Tell the worker its stages are empty (once, until it is leased something again)."""
        self.empty_sent = True
        self.outbox.put_nowait(StagesEmpty())

    def ask_to_reconnect(self) -> None:
        """The server is shutting down: no new leases; the worker closes and resumes elsewhere."""
        self.draining = self.reconnecting = True
        self.outbox.put_nowait(Reconnect())
