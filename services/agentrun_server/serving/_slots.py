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
    """Open calls of one kind, counted in all and per peer host.

    Args:
        what: What the calls are, for messages ("upload streams").
        total: Most open at once in all (None: no limit), as (setting name, value).
        per_peer: Most open at once from one peer host, as (setting name, value).
        retry_after_seconds: The RetryInfo delay of a refusal.
    """

    def __init__(
        self,
        what: str,
        total: tuple[str, int] | None,
        per_peer: tuple[str, int],
        retry_after_seconds: float = 1.0,
    ) -> None:
        self.what = what
        self.total = total
        self.per_peer = per_peer
        self.retry_after_seconds = retry_after_seconds
        self.open = 0
        self._by_peer: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, peer: str) -> Iterator[None]:
        """Hold a slot for the duration of a call.

        Raises:
            ResourceExhausted: with RetryInfo, when `total` or `per_peer` slots are taken.
        """
        host = peer_host(peer)
        held = self._by_peer.get(host, 0)
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
        self.open += 1
        self._by_peer[host] = held + 1
        try:
            yield
        finally:
            self.open -= 1
            left = self._by_peer[host] - 1
            if left:
                self._by_peer[host] = left
            else:
                del self._by_peer[host]
