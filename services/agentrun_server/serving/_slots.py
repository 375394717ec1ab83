"""Stream slots: how many long calls of one kind may be open, in all and per peer, so that a few
clients (or one host opening many connections) cannot hold every slot."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from agentrun_server._errors import ResourceExhausted


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7",
    "ipv6:[::1]:51234" -> "ipv6:[::1]"; others (unix sockets) whole."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, _, port = peer.rpartition(":")
        if port.isdigit():
            return host
    return peer


class StreamSlots:
    """Open calls of one kind, counted in all, per peer host, and per API key.

    Args:
        what: What the calls are, for messages ("upload streams").
        total: Most open at once in all (None: no limit), as (setting name, value).
        per_peer: Most open at once from one peer host, as (setting name, value).
        retry_after_seconds: The RetryInfo delay of a refusal.
        per_key: Most open at once under one API key (None: no limit), as (setting name,
            value): hosts behind one NAT or proxy share a peer address, so with keys on this is
            what keeps one client from taking every slot.
    """

    def __init__(
        self,
        what: str,
        total: tuple[str, int] | None,
        per_peer: tuple[str, int],
        retry_after_seconds: float = 1.0,
        per_key: tuple[str, int] | None = None,
    ) -> None:
        self.what = what
        self.total = total
        self.per_peer = per_peer
        self.per_key = per_key
        self.retry_after_seconds = retry_after_seconds
        self.open = 0
        self._by_peer: dict[str, int] = {}
        self._by_key: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, peer: str, key: str = "") -> Iterator[None]:
        """Hold a slot for the duration of a call; `key` names the caller's API key ("" when
        the server checks none).

        Raises:
            ResourceExhausted: with RetryInfo, when `total`, `per_peer` or `per_key` slots are
                taken.
        """
        host = peer_host(peer)
        held = self._by_peer.get(host, 0)
        mine = self._by_key.get(key, 0) if key else 0
        if self.total is not None and self.open >= self.total[1]:
            name, limit = self.total
            raise ResourceExhausted(
                f"{self.what}: {self.open} open, at {name}={limit}; retry later",
                self.retry_after_seconds,
            )
        if held >= self.per_peer[1]:
            name, limit = self.per_peer
            raise ResourceExhausted(
                f"{self.what}: {held} open from client host {host}, at {name}={limit}; retry later",
                self.retry_after_seconds,
            )
        if key and self.per_key is not None and mine >= self.per_key[1]:
            name, limit = self.per_key
            raise ResourceExhausted(
                f"{self.what}: {mine} open under API key {key!r}, at {name}={limit}; close some, "
                "or retry later",
                self.retry_after_seconds,
            )
        self.open += 1
        self._by_peer[host] = held + 1
        if key:
            self._by_key[key] = mine + 1
        try:
            yield
        finally:
            self.open -= 1
            _release(self._by_peer, host)
            if key:
                _release(self._by_key, key)


def _release(counts: dict[str, int], name: str) -> None:
    left = counts[name] - 1
    if left:
        counts[name] = left
    else:
        del counts[name]
