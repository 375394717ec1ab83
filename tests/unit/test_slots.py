"""Stream slots, counted in all and per client host."""

from __future__ import annotations

import pytest

from agentrun_server import ResourceExhausted
from agentrun_server.serving import StreamSlots
from agentrun_server.serving._slots import peer_host


def test_peer_host_drops_the_port() -> None:
    assert peer_host("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/agentrun.sock") == "unix:/tmp/agentrun.sock"


def test_a_host_at_its_limit_leaves_room_for_others_and_slots_come_back() -> None:
    slots = StreamSlots("upload streams", total=("max_streams", 3), per_peer=("max_per_peer", 2))
    with slots.slot("ipv4:10.0.0.1:1"), slots.slot("ipv4:10.0.0.1:2"):
        with pytest.raises(
            ResourceExhausted, match=r"2 open from client host ipv4:10\.0\.0\.1, at max_per_peer=2"
        ):
            slots.slot("ipv4:10.0.0.1:3").__enter__()
        with slots.slot("ipv4:10.0.0.2:1"):
            with pytest.raises(ResourceExhausted, match="3 open, at max_streams=3") as refused:
                slots.slot("ipv4:10.0.0.3:1").__enter__()
            assert refused.value.retry_after_seconds == 1.0
        assert slots.open == 2
    assert slots.open == 0
    with slots.slot("ipv4:10.0.0.1:4"):
        assert slots.open == 1


def test_one_key_behind_many_hosts_holds_at_most_its_share() -> None:
    slots = StreamSlots(
        "watch streams",
        total=("max_watch_streams", 10),
        per_peer=("max_watch_streams_per_peer", 10),
        per_key=("max_watch_streams_per_key", 2),
    )
    with slots.slot("ipv4:10.0.0.1:1", "fleet"), slots.slot("ipv4:10.0.0.2:1", "fleet"):
        with pytest.raises(ResourceExhausted, match="under API key 'fleet', at max_watch"):
            slots.slot("ipv4:10.0.0.3:1", "fleet").__enter__()
        with slots.slot("ipv4:10.0.0.3:1", "other"), slots.slot("ipv4:10.0.0.3:2", ""):
            assert slots.open == 4  # another key, and no key (auth off), are not counted with it
    with slots.slot("ipv4:10.0.0.1:1", "fleet"):  # its slots came back
        assert slots.open == 1
