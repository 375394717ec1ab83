"""The worker's half of the Work protocol, with no I/O (`agentrun.work.WorkProtocol`): batched
settles, a drain written before the releases after it, extensions and heartbeats as they come
due, refusals, and a reconnect that resumes the leases held and resends what was never acked."""

from __future__ import annotations

from agentrun.v1 import orchestrator_service_pb2 as pb
from agentrun.work import Lease, WorkProtocol
from agentrun.work._protocol import MESSAGE_ITEMS


def _wire_lease(n: int, stage: str = "a", deadline: float = 130.0) -> pb.Lease:
    lease = pb.Lease(task_id=str(n), lease_id=f"L{n}", stage=stage, attempt=1, max_attempts=3)
    lease.deadline.FromNanoseconds(int(deadline * 1e9))
    lease.agent_run.id = f"run-{n}"
    return lease


def _leases(*numbers: int, deadline: float = 130.0) -> pb.WorkResponse:
    return pb.WorkResponse(
        leases=pb.LeaseBatch(leases=[_wire_lease(n, deadline=deadline) for n in numbers])
    )


def _subscribed(idle: float = 60.0, resumed: list[pb.Ack] | None = None) -> pb.Subscribed:
    subscribed = pb.Subscribed(session_id="s", resumed=resumed or [])
    subscribed.idle_timeout.FromNanoseconds(int(idle * 1e9))
    return subscribed


def _kinds(requests: list[pb.WorkRequest]) -> list[str | None]:
    return [r.WhichOneof("kind") for r in requests]


def _acks(*pairs: tuple[str, int]) -> pb.WorkResponse:
    return pb.WorkResponse(
        acks=pb.AckBatch(acks=[pb.Ack(task_id=t, lease_id=f"L{t}", code=c) for t, c in pairs])
    )


def _started(now: float = 100.0) -> WorkProtocol:
    protocol = WorkProtocol("w", ["a"], credits=4, worker="test")
    first = protocol.subscribe(now)
    assert first.subscribe.credits == 4 and not first.subscribe.resume
    protocol.on_subscribed(_subscribed(), [])
    return protocol


def test_settles_are_batched_one_message_per_kind_and_acked_in_order() -> None:
    protocol = _started()
    protocol.on_response(_leases(1, 2, 3), now=100.0)
    one, two, three = (protocol.ready.popleft() for _ in range(3))
    assert isinstance(one, Lease) and one.agent_run_id == "run-1" and one.deadline == 130.0
    assert protocol.complete(one, "next") and protocol.complete(two, "next")
    assert protocol.fail(three, "boom", retry_after_seconds=2.0)
    assert not protocol.complete(one, "again")  # settled already: nothing queued
    written = protocol.outgoing(now=101.0)
    assert _kinds(written) == ["complete_tasks", "fail_tasks"]
    assert [c.task_id for c in written[0].complete_tasks.completions] == ["1", "2"]
    assert written[1].fail_tasks.failures[0].retry_after.seconds == 2
    assert protocol.unsettled == 3 and not protocol.held
    protocol.on_response(_acks(("1", 0), ("2", 0)), now=101.5)
    protocol.on_response(_acks(("3", 0)), now=101.5)
    assert protocol.unsettled == 0 and not protocol.refusals


def test_a_drain_goes_before_the_releases_after_it_and_ends_the_work_once_nothing_is_held() -> None:
    protocol = _started()
    protocol.on_response(_leases(1, 2), now=100.0)
    first = protocol.ready.popleft()
    protocol.drain()
    protocol.release(first)
    assert _kinds(protocol.outgoing(now=100.5)) == ["drain", "release_tasks"]
    assert not protocol.finished  # lease 2 is still held
    protocol.close()  # hands back what was never handed out
    assert _kinds(protocol.outgoing(now=100.6)) == ["release_tasks"]
    assert protocol.finished and protocol.done_writing


def test_extensions_and_heartbeats_come_due_on_their_own() -> None:
    protocol = _started(now=100.0)  # idle timeout 60 s: a heartbeat after 20 s of silence
    protocol.on_response(_leases(1, deadline=160.0), now=100.0)  # a 60 s lease
    assert protocol.next_write_at(100.0) == 101.0  # nothing due within the second
    assert protocol.outgoing(now=119.0) == []
    (heartbeat,) = protocol.outgoing(now=120.5)
    assert heartbeat.WhichOneof("kind") == "heartbeat"
    (extension,) = protocol.outgoing(now=131.0)  # half of the lease used up
    assert extension.extend_leases.extensions[0].lease_duration.seconds == 60
    assert protocol.outgoing(now=131.5) == []  # one extension in flight at a time
    ack = pb.Ack(task_id="1", lease_id="L1", code=0)
    ack.deadline.FromNanoseconds(int(191.0 * 1e9))
    protocol.on_response(pb.WorkResponse(acks=pb.AckBatch(acks=[ack])), now=131.6)
    assert protocol.held["1"].deadline == 191.0


def test_a_refused_completion_fails_the_attempt_with_the_servers_reason() -> None:
    protocol = _started()
    protocol.on_response(_leases(1), now=100.0)
    protocol.complete(protocol.ready.popleft(), "no-such-pathway")
    protocol.outgoing(now=100.1)
    refusal = pb.Ack(task_id="1", lease_id="L1", code=3, message="pathway 'x' is not a pathway")
    protocol.on_response(pb.WorkResponse(acks=pb.AckBatch(acks=[refusal])), now=100.2)
    assert [r.code for r in protocol.refusals] == [3]
    (failure,) = protocol.outgoing(now=100.3)
    item = failure.fail_tasks.failures[0]
    assert item.non_retryable and "refused the worker's completion" in item.error


def test_a_reconnect_resumes_what_is_held_and_resends_what_was_never_acked() -> None:
    protocol = _started()
    protocol.on_response(_leases(1, 2, 3), now=100.0)
    one = protocol.ready.popleft()
    protocol.complete(one, "next")
    protocol.outgoing(now=100.1)  # written, never acked: the stream breaks
    protocol.on_response(pb.WorkResponse(reconnect=pb.Reconnect()), now=100.2)
    assert protocol.reconnect_asked and protocol.done_writing
    assert protocol.outgoing(now=100.3) == []  # nothing more on a stream asked to reconnect
    again = protocol.subscribe(now=101.0)
    assert [r.task_id for r in again.subscribe.resume] == ["2", "3"]
    resumed = protocol.resumable()
    kept = pb.Ack(code=0)
    kept.deadline.FromNanoseconds(int(130.0 * 1e9))
    revoked = protocol.on_subscribed(
        _subscribed(resumed=[kept, pb.Ack(code=9, message="expired")]), resumed
    )
    assert [(lease.task_id, why) for lease, why in revoked] == [("3", "not resumed: expired")]
    (resent,) = protocol.outgoing(now=101.1)
    assert [c.task_id for c in resent.complete_tasks.completions] == ["1"]
    protocol.on_response(_acks(("1", 9)), now=101.2)  # a resend refused: expected, said so
    assert protocol.refusals[-1].resent


def test_a_revoked_lease_is_dropped_and_never_settled() -> None:
    protocol = _started()
    protocol.on_response(_leases(1, 2), now=100.0)
    revoked = protocol.on_response(
        pb.WorkResponse(
            revoked=pb.LeasesRevoked(
                leases=[
                    pb.RevokedLease(task_id="2", lease_id="L2", reason=pb.REVOKE_REASON_CANCELLED)
                ]
            )
        ),
        now=100.5,
    )
    assert [(lease.task_id, why) for lease, why in revoked] == [("2", "cancelled")]
    assert [lease.task_id for lease in protocol.ready] == ["1"]
    assert not protocol.complete(revoked[0][0], "next")


def test_a_stage_quota_hands_back_what_comes_over_it() -> None:
    protocol = WorkProtocol("w", ["a"], credits=4, max_tasks_per_stage=1)
    first = protocol.subscribe(100.0)
    assert first.subscribe.stages[0].max_tasks == 1
    protocol.on_subscribed(_subscribed(), [])
    protocol.on_response(_leases(1, 2), now=100.0)
    assert [lease.task_id for lease in protocol.ready] == ["1"]
    (release,) = protocol.outgoing(now=100.1)
    assert [r.task_id for r in release.release_tasks.releases] == ["2"]
    protocol.complete(protocol.ready.popleft(), "")
    assert protocol.quota_reached() and protocol.finished


def test_many_settles_at_once_go_in_messages_of_at_most_MESSAGE_ITEMS_each_acked_in_turn() -> None:
    protocol = WorkProtocol("w", ["a"], credits=200, worker="test")
    protocol.subscribe(100.0)
    protocol.on_subscribed(_subscribed(), [])
    numbers = range(1, 151)
    protocol.on_response(_leases(*numbers), now=100.0)
    while protocol.ready:
        protocol.complete(protocol.ready.popleft(), "next")
    written = protocol.outgoing(now=100.1)
    sizes = [len(r.complete_tasks.completions) for r in written]
    assert sizes == [MESSAGE_ITEMS, MESSAGE_ITEMS, 150 - 2 * MESSAGE_ITEMS]
    assert [c.task_id for r in written for c in r.complete_tasks.completions] == [
        str(n) for n in numbers
    ]
    # Each message is answered by its own ack batch, in order: a refusal in the second is
    # matched to the completion it refused.
    protocol.on_response(_acks(*((str(n), 0) for n in numbers[:MESSAGE_ITEMS])), now=100.2)
    second = [(str(n), 0) for n in numbers[MESSAGE_ITEMS : 2 * MESSAGE_ITEMS]]
    second[0] = (second[0][0], 9)  # FAILED_PRECONDITION: the lease was no longer current
    protocol.on_response(_acks(*second), now=100.2)
    protocol.on_response(_acks(*((str(n), 0) for n in numbers[2 * MESSAGE_ITEMS :])), now=100.2)
    assert protocol.unsettled == 0
    assert [(r.task_id, r.kind) for r in protocol.refusals] == [
        (str(MESSAGE_ITEMS + 1), "complete_tasks")
    ]


def test_an_extension_comes_due_for_a_lease_added_later_with_an_earlier_deadline() -> None:
    protocol = _started(now=100.0)
    protocol.on_response(_leases(1, deadline=700.0), now=100.0)  # due at 400
    assert protocol.outgoing(now=101.0) == []
    protocol.on_response(_leases(2, deadline=140.0), now=100.0)  # due at 120: before lease 1
    assert protocol.next_write_at(110.0) == 111.0  # within the second: nothing earlier
    assert protocol.next_write_at(119.5) == 120.0
    (extension,) = (r for r in protocol.outgoing(now=121.0) if r.HasField("extend_leases"))
    assert [e.task_id for e in extension.extend_leases.extensions] == ["2"]
    # After a reconnect, the leases resumed with new deadlines come due by those.
    protocol.subscribe(130.0)
    resumed = [pb.Ack(task_id=t, lease_id=f"L{t}", code=0) for t in ("1", "2")]
    resumed[0].deadline.FromNanoseconds(int(150.0 * 1e9))  # lease 1 now ends at 150 (due 125)
    resumed[1].deadline.FromNanoseconds(int(900.0 * 1e9))
    protocol.on_subscribed(_subscribed(resumed=resumed), protocol.resumable())
    (again,) = (r for r in protocol.outgoing(now=131.0) if r.HasField("extend_leases"))
    assert [e.task_id for e in again.extend_leases.extensions] == ["1"]


def test_settles_wait_for_the_ack_of_those_before_them_unless_a_message_is_full() -> None:
    # Nagle's rule: one settle goes at once; those queued while it awaits its ack go together
    # when the ack comes, or as soon as a full message's worth is queued.
    protocol = WorkProtocol("w", ["a"], credits=200, worker="test")
    protocol.subscribe(100.0)
    protocol.on_subscribed(_subscribed(), [])
    protocol.on_response(_leases(*range(1, 101)), now=100.0)
    leases = {lease.task_id: lease for lease in protocol.ready}
    protocol.complete(leases["1"], "next")
    (first,) = protocol.outgoing(now=100.1)
    assert [c.task_id for c in first.complete_tasks.completions] == ["1"]
    protocol.fail(leases["2"], "boom")
    completed = [str(n) for n in range(3, 4 + MESSAGE_ITEMS)]  # one more than a message holds
    for task_id in completed[: MESSAGE_ITEMS - 1]:
        protocol.complete(leases[task_id], "next")
    assert protocol.outgoing(now=100.2) == []  # held back: "1" awaits its ack
    for task_id in completed[MESSAGE_ITEMS - 1 :]:
        protocol.complete(leases[task_id], "next")
    (full,) = protocol.outgoing(now=100.3)  # a full message goes; the completion over it waits
    assert [c.task_id for c in full.complete_tasks.completions] == completed[:MESSAGE_ITEMS]
    protocol.on_response(_acks(("1", 0)), now=100.4)
    assert protocol.outgoing(now=100.4) == []  # the full message still awaits its ack
    protocol.on_response(_acks(*((t, 0) for t in completed[:MESSAGE_ITEMS])), now=100.5)
    rest = protocol.outgoing(now=100.5)
    assert _kinds(rest) == ["complete_tasks", "fail_tasks"]
    assert [c.task_id for c in rest[0].complete_tasks.completions] == completed[MESSAGE_ITEMS:]
    assert [f.task_id for f in rest[1].fail_tasks.failures] == ["2"]
    # Handing back goes at once, whatever awaits an ack.
    protocol.drain()
    protocol.release(leases["90"])
    assert _kinds(protocol.outgoing(now=100.6)) == ["drain", "release_tasks"]
