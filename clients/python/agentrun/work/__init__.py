"""The Work protocol's worker side: the public reference other clients mirror.

- `WorkProtocol`: the rules, as a state machine with no I/O (credits, batched settles,
  extensions, heartbeats, revocations, drain, reconnect and resume, close): what to write, and
  what each message from the server changes.
- `WorkStream`: that state machine driven over gRPC, across reconnects; the `Runner` is built on
  it, and a worker that wants its own loop can use it directly:

      async with WorkStream(None, "grading", ["triage"], credits=8) as stream:
          async for lease in stream:          # pushed by the server as tasks become ready
              stream.complete(lease, "solved")   # batched with others, acked later

- `Lease`: a task leased to the worker (its run in wire form, `lease_id` the fencing token).
"""

from __future__ import annotations

from agentrun.work._protocol import HeldLease, Lease, Refusal, WorkProtocol
from agentrun.work._stream import OnRevoked, WorkStream

__all__ = ["HeldLease", "Lease", "OnRevoked", "Refusal", "WorkProtocol", "WorkStream"]
