"""Live runs from the SDK: a handle a long-running agent keeps (`AgentRunWriter.live_run`), whose
appends travel as sequenced events over one StreamAgentRunEvents stream per writer.

Events are encoded once, when made (with a spool, written to its event journal before `append`
returns), and sent in the order they were made, many per message, as soon as the stream has room;
each is acknowledged once durable. When the stream breaks, the events not yet acknowledged are
sent again, in order, on a new one: the server stores each sequence number once (a resend is a
duplicate), so nothing is lost or stored twice. `append` blocks only while the writer's
`max_pending_events` are unacknowledged.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun import _metrics
from agentrun._convert import (
    message_to_proto,
    run_metadata_to_proto,
    score_to_proto,
    value_to_proto,
)
from agentrun._errors import AgentRunError
from agentrun._event_spool import EventJournal
from agentrun._metadata import BaseMetadata
from agentrun._retry import Backoff, Failure, Verdict
from agentrun.chat import ChatMessage, parse_chat_message
from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.wire.codes import Code, code_name
from agentrun.wire.framing import encode_events_request

_log = logging.getLogger(__name__)

EVENTS_METHOD = "/agentrun.v1.IngestionService/StreamAgentRunEvents"
MAX_EVENTS_PER_MESSAGE = 500
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""A request message holds events up to this many bytes (and at least one)."""
MAX_EVENT_BYTES = 16 * 1024 * 1024
"""The largest event: the server's default max_run_bytes (its messages take 17 MiB)."""
MAX_MESSAGES_IN_FLIGHT = 8
IDLE_CLOSE_SECONDS = 10.0
"""A stream with nothing to send or to hear back for this long is closed, and opened again for the
next event: the server ends streams idle for its `stream_idle_seconds` (30 s by default), and an
idle stream would hold one of its per-host slots for nothing."""


class LiveRunError(AgentRunError):
    """An event of a live run was refused by the server (the run is left as it was before it), the
    run cannot be opened (finished already), another writer's events hold its sequence numbers
    (a conflict), or the server refuses this writer's events for good (its key, say)."""


@dataclass(frozen=True)
class RefusedEvent:
    """A live run event the server refused: the run, the event's sequence number, the gRPC status
    name (e.g. "FAILED_PRECONDITION") and the server's reason."""

    agent_run_id: str
    sequence: int
    code: str
    message: str


class Event(NamedTuple):
    """An encoded `AgentRunEvent` with what the sender needs to know of it."""

    data: bytes
    agent_run_id: str
    sequence: int
    finish: bool

    @classmethod
    def decode(cls, data: bytes) -> Event:
        """Raises: google.protobuf.message.DecodeError: not an encoded AgentRunEvent."""
        event = pb.AgentRunEvent.FromString(data)
        return cls(data, event.agent_run_id, event.sequence, event.finish)


def _metadata(fields: Mapping[str, Any], out: run_pb.Metadata) -> None:
    out.SetInParent()
    for key, value in fields.items():
        value_to_proto(value, out.fields[key].value)


class EventSender:
    """One writer's StreamAgentRunEvents stream, on a thread of its own.

    Args:
        replayed: Events a spool held at start (already in `journal`): sent first, in order.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...],
        max_pending_events: int,
        backoff: Backoff,
        journal: EventJournal | None = None,
        replayed: Iterable[Event] = (),
    ) -> None:
        self._call = channel.stream_stream(
            EVENTS_METHOD,
            request_serializer=None,  # requests are built from encoded events
            response_deserializer=pb.StreamAgentRunEventsResponse.FromString,
        )
        self._metadata = metadata
        self._max_pending = max_pending_events
        self._backoff = backoff
        self._journal = journal
        self._cond = threading.Condition()
        self._queued: collections.deque[Event] = collections.deque(replayed)
        self._in_flight: collections.deque[list[Event]] = collections.deque()
        self._pending = len(self._queued)
        self._generation = 0
        self._stopping = False
        self._last: dict[str, tuple[int, bool]] = {}
        """Per run with events not all acknowledged: its last sequence number made, and whether
        that event finishes it. Where a run resumed in this process continues."""
        for event in self._queued:
            self._last[event.agent_run_id] = (event.sequence, event.finish)
        self.stored = 0
        self.duplicates = 0
        self.refused: list[RefusedEvent] = []
        self.unopened: dict[str, RefusedEvent] = {}
        """Runs whose opening event (sequence 1) the server refused, by run id: the run does not
        exist, so every later event of it would be refused too."""
        self.conflicts: dict[str, RefusedEvent] = {}
        """Runs whose events conflicted with another writer's (refused ABORTED), by run id: the
        first such event. Their `LiveRun` raises on the next append."""
        self.last_error: str | None = None
        """Why the stream last broke (code and the server's message), for the summary."""
        self.fatal: str | None = None
        """Set when the server refuses the stream for good (an unknown, revoked or expired key;
        no permission): nothing more is sent, and new events are refused."""
        self._thread = threading.Thread(target=self._run, name="agentrun-live-runs", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Events made (or replayed) and not yet acknowledged."""
        return self._pending

    def last_made(self, agent_run_id: str) -> tuple[int, bool] | None:
        """(sequence, finishes) of the run's last event not yet acknowledged, if any."""
        with self._cond:
            return self._last.get(agent_run_id)

    def submit(self, event: Event) -> None:
        """Queue an event (and write it to the spool); blocks while `max_pending_events` are
        unacknowledged.

        Raises:
            SpoolError: the spool refused the write; the event was not queued.
        """
        with self._cond:
            while self._pending >= self._max_pending and not self._stopping and not self.fatal:
                self._cond.wait()
            if self.fatal:
                raise LiveRunError(f"live run events are refused by the server: {self.fatal}")
            if self._journal is not None:
                self._journal.append(event.data)
            self._queued.append(event)
            self._pending += 1
            self._last[event.agent_run_id] = (event.sequence, event.finish)
            self._cond.notify_all()

    def flush(self, timeout_seconds: float | None = None) -> bool:
        """Wait until every event made so far is acknowledged; whether it was, in time."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        with self._cond:
            while self._pending and not self.fatal:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return not self._pending

    def stop(self, timeout_seconds: float) -> int:
        """Flush within the timeout, then stop; return the events left unacknowledged."""
        self.flush(timeout_seconds)
        with self._cond:
            self._stopping = True
            left = self._pending
            self._cond.notify_all()
        self._thread.join(timeout=5)
        return left

    def _requests(self, generation: int) -> Iterator[bytes]:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                while (
                    (not self._queued or len(self._in_flight) >= MAX_MESSAGES_IN_FLIGHT)
                    and not self._stopping
                    and generation == self._generation
                ):
                    if self._queued or self._in_flight:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= IDLE_CLOSE_SECONDS:
                        return  # closes our side: opened again for the next event
                    self._cond.wait(0.5)
                if self._stopping or generation != self._generation:
                    return
                batch = [self._queued.popleft()]
                size = len(batch[0].data)
                while self._queued and len(batch) < MAX_EVENTS_PER_MESSAGE:
                    size += len(self._queued[0].data) + 6  # its tag and length prefix
                    if size > MAX_MESSAGE_BYTES:
                        break
                    batch.append(self._queued.popleft())
                self._in_flight.append(batch)
            yield encode_events_request(event.data for event in batch)

    def _acked(self, response: pb.StreamAgentRunEventsResponse) -> None:
        with self._cond:
            batch = self._in_flight.popleft()
            self._pending -= len(batch)
            if self._journal is not None:
                self._journal.settle(len(batch))
            for event in batch:
                if self._last.get(event.agent_run_id, (0, False))[0] == event.sequence:
                    del self._last[event.agent_run_id]
            self._cond.notify_all()
        for ack in response.acks:
            if ack.status == pb.EVENT_STATUS_STORED:
                self.stored += 1
                _metrics.WRITER_LIVE_EVENTS.labels("stored").inc()
            elif ack.status == pb.EVENT_STATUS_DUPLICATE:
                self.duplicates += 1
                _metrics.WRITER_LIVE_EVENTS.labels("duplicate").inc()
            else:
                code = code_name(ack.code)
                refused = RefusedEvent(ack.agent_run_id, ack.sequence, code, ack.message)
                self.refused.append(refused)
                with self._cond:
                    if ack.code == Code.ABORTED:
                        self.conflicts.setdefault(ack.agent_run_id, refused)
                    elif ack.sequence == 1:
                        self.unopened.setdefault(ack.agent_run_id, refused)
                    # The events after a refused opening are refused for the same cause: said once.
                    quiet = ack.sequence > 1 and ack.agent_run_id in self.unopened
                _metrics.WRITER_LIVE_EVENTS.labels("refused").inc()
                _log.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "live run %s: event %d refused: %s: %s",
                    ack.agent_run_id,
                    ack.sequence,
                    code,
                    ack.message,
                )

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                # A stream is opened only when there is something to send.
                while not self._queued and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                generation = self._generation
            try:
                responses = self._call(
                    self._requests(generation), metadata=self._metadata, wait_for_ready=True
                )
                for response in responses:
                    self._acked(response)
                    attempt = 0
            except grpc.RpcError as exc:
                failure = Failure.of(exc)
                attempt += 1
                delay = self._backoff.delay(attempt, failure.retry_after_seconds)
                with self._cond:
                    self.last_error = str(failure)
                    if failure.verdict(stream=True) is Verdict.GIVE_UP:
                        # Retrying would be answered the same (an unknown, revoked or expired
                        # key; no permission): the events stay unacknowledged (spooled, if any).
                        self.fatal = str(failure)
                        _log.error(
                            "live runs: the server refuses this writer's events: %s", failure
                        )
                        self._cond.notify_all()
                        return
                    if self._stopping:
                        return
                    _log.info("live runs: stream broke (%s); resending in %.2f s", failure, delay)
                    # Unacknowledged events go again, first and in order: the server answers
                    # those it stored already as duplicates.
                    while self._in_flight:
                        self._queued.extendleft(reversed(self._in_flight.pop()))
                    self._generation += 1
                    self._cond.notify_all()
                    self._cond.wait(delay)
            else:
                with self._cond:
                    self._generation += 1
                    if self._stopping:
                        return


class LiveRun:
    """A run that grows while the agent works (see `AgentRunWriter.live_run`).

    Thread-safe: events take sequence numbers in the order the calls are made. Leaving the `with`
    block finishes the run; an exception finishes it with `error` set in its metadata.
    """

    def __init__(
        self,
        sender: EventSender,
        agent_run_id: str,
        collection_id: str,
        next_sequence: int,
    ) -> None:
        self.agent_run_id = agent_run_id
        self.collection_id = collection_id
        self._sender = sender
        self._next = next_sequence
        self._lock = threading.Lock()
        self.finished = False

    def _send(self, patch: run_pb.AgentRun, finish: bool = False) -> int:
        if patch.ByteSize() > MAX_EVENT_BYTES:
            raise LiveRunError(
                f"live run {self.agent_run_id!r}: an event of {patch.ByteSize():,} bytes, over "
                f"{MAX_EVENT_BYTES:,}; append fewer messages at a time"
            )
        with self._lock:
            if self.finished:
                raise LiveRunError(f"live run {self.agent_run_id!r} is finished")
            unopened = self._sender.unopened.get(self.agent_run_id)
            if unopened is not None:
                raise LiveRunError(
                    f"live run {self.agent_run_id!r}: its opening event was refused "
                    f"({unopened.code}): {unopened.message}"
                )
            conflict = self._sender.conflicts.get(self.agent_run_id)
            if conflict is not None:
                raise LiveRunError(
                    f"live run {self.agent_run_id!r}: event {conflict.sequence} conflicts with "
                    f"another writer's: {conflict.message}"
                )
            sequence = self._next
            data = pb.AgentRunEvent(
                agent_run_id=self.agent_run_id,
                sequence=sequence,
                collection_id=self.collection_id,
                patch=patch,
                finish=finish,
            ).SerializeToString()
            # Under the lock: the queue keeps sequence order. A spool that refuses the event
            # raises here, and the sequence number stays free.
            self._sender.submit(Event(data, self.agent_run_id, sequence, finish))
            self._next = sequence + 1
            self.finished = finish
        return sequence

    def append(self, transcript: str, messages: Iterable[ChatMessage | dict[str, Any]]) -> int:
        """Append messages to a transcript (created by its first append); return the event's
        sequence number. With a spool, the event is on disk when this returns.

        Messages are `agentrun.chat` models, or dicts with a `role` (as Docent's
        `parse_chat_message` takes them: `{"role": "user", "content": "..."}`). A message without
        a timestamp is stamped with the time of this call.

        Raises:
            LiveRunError: the run is finished, its opening event was refused (the server's reason
                given), another writer's events conflict with it, or the event is over 16 MiB
                encoded.
            SpoolError: the spool refused the write; nothing was appended.
            ValueError: a dict without a known role; pydantic.ValidationError: one whose fields
                do not fit its role. Nothing was appended.
        """
        patch = run_pb.AgentRun()
        part = patch.transcripts.add(key=transcript)
        now = Timestamp()
        now.GetCurrentTime()
        for message in messages:
            out = part.messages.add()
            message_to_proto(parse_chat_message(message), out)
            if not out.HasField("timestamp"):
                out.timestamp.CopyFrom(now)
        return self._send(patch)

    def set_scores(self, **scores: bool | int | float) -> int:
        """Set scores by name (merged with those set before)."""
        patch = run_pb.AgentRun()
        for name, value in scores.items():
            score_to_proto(value, patch.scores[name])
        return self._send(patch)

    def update_metadata(self, **fields: Any) -> int:
        """Set metadata fields (JSON-like values; merged by name with those set before)."""
        patch = run_pb.AgentRun()
        _metadata(fields, patch.metadata)
        return self._send(patch)

    def finish(self, error: str | None = None) -> int:
        """Finish the run: it enters its collection's workflow and takes no more events. With
        `error`, the metadata field `error` says what went wrong."""
        patch = run_pb.AgentRun()
        if error is not None:
            _metadata({"error": error}, patch.metadata)
        return self._send(patch, finish=True)

    def open(
        self,
        name: str | None,
        description: str | None,
        metadata: BaseMetadata | Mapping[str, Any] | None,
    ) -> None:
        patch = run_pb.AgentRun()
        if name is not None:
            patch.name = name
        if description is not None:
            patch.description = description
        if metadata:
            run_metadata_to_proto(metadata, patch)
        self._send(patch)

    @property
    def conflict(self) -> RefusedEvent | None:
        """The first of this run's events refused because another writer's event holds its
        sequence number (ABORTED), if any: the run's events after it may interleave with the
        other writer's, and `append` raises from then on."""
        return self._sender.conflicts.get(self.agent_run_id)

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if not self.finished:
            self.finish(None if error is None else f"{type(error).__name__}: {error}")
