"""`AgentRunWriter`: non-blocking background uploads, with the API of Docent's AgentRunWriter.

Unlike Docent's writer it never loses a run silently: every run logged ends accepted, duplicate,
rejected (with the server's reason) or undelivered, and `finish()` returns those counts. A timeout
is retried, not a reason to drop a batch; resending is safe because run ids are idempotency keys.
With `spool_dir`, runs are on disk before `log_agent_runs` returns (live run events before
`LiveRun.append` returns) and stay there until the server acknowledges them, so a killed process
loses nothing. Runs are encoded when logged (later edits do not leak into the upload, and a bad run
raises in the caller). The writer installs no signal handlers and never hangs interpreter exit: its
threads are daemons, and a forgotten `finish()` runs at exit, bounded by `shutdown_timeout`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from agentrun import _metrics
from agentrun._agent_run import AgentRun
from agentrun._client import Client
from agentrun._connection import Connection, connection_of
from agentrun._convert import agent_run_to_proto
from agentrun._errors import InvalidRunError, RpcError, WriterClosedError
from agentrun._live_run import Event, EventSender, LiveRun, LiveRunError, RefusedEvent
from agentrun._metadata import BaseMetadata
from agentrun._retry import Backoff, Failure, Verdict
from agentrun._spool import Segment, Spool
from agentrun._tls_probe import tls_mismatch
from agentrun.v1 import agent_run_pb2
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.wire.checks import InvalidRun, check_agent_run, encodes_shallow, parse_agent_run
from agentrun.wire.framing import encode_upload_request

_log = logging.getLogger(__name__)

UPLOAD_METHOD = "/agentrun.v1.IngestionService/UploadAgentRuns"
UPLOAD_TIMEOUT_SECONDS = 120.0
_NEVER_DELIVERS = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND}
)
"""Refusals of an upload that no later upload of this writer can escape: an unknown, revoked or
expired key, a key without the `ingest` scope or outside its collection limit, an unknown
collection."""
_COMPRESSION = {None: grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


@dataclass(frozen=True)
class RejectedRun:
    """A run the server refused, with its reason (e.g. "INVALID", "TOO_LARGE") and explanation."""

    agent_run_id: str
    reason: str
    message: str


@dataclass
class WriteSummary:
    """What became of every run logged to a writer (and replayed from its spool)."""

    accepted: int = 0
    """Runs stored by this writer."""
    duplicates: int = 0
    """Runs whose id the server had stored already: logged twice, or resent after a lost ack."""
    rejected: list[RejectedRun] = field(default_factory=list)
    """Runs the server refused, with reasons."""
    undelivered: int = 0
    """Runs never acknowledged: the server was unreachable, or finish() timed out or was forced."""
    spooled: int = 0
    """Of the undelivered runs, those kept in the spool for the next writer on it to deliver."""
    replayed: int = 0
    """Runs found in the spool at start, left by an earlier writer (counted in the results too)."""
    errors: list[str] = field(default_factory=list)
    """Why batches went undelivered."""
    spool_damage: list[str] = field(default_factory=list)
    """Damaged spool segments and event logs found at start (torn by a crash or power loss): one
    line each, with how many whole runs or events were salvaged and where the file was set aside.
    What lay past a tear is lost."""
    events_stored: int = 0
    """Live run events (`live_run`) stored by this writer."""
    events_duplicate: int = 0
    """Live run events the server had stored already (resent after a lost ack, or replayed)."""
    events_refused: list[RefusedEvent] = field(default_factory=list)
    """Live run events the server refused, with its reasons."""
    events_undelivered: int = 0
    """Live run events never acknowledged (the server out of reach until `shutdown_timeout`)."""
    events_spooled: int = 0
    """Of the undelivered events, those kept in the spool for the next writer on it to send."""
    events_replayed: int = 0
    """Live run events found in the spool at start, left by an earlier writer."""

    @property
    def ok(self) -> bool:
        """True when every run and event was stored or found stored, and the spool was whole."""
        return not (
            self.rejected
            or self.undelivered
            or self.spool_damage
            or self.events_refused
            or self.events_undelivered
        )

    SHOWN = 3
    """Rejections and errors `str()` shows in full; the rest are counted."""

    def __str__(self) -> str:
        """A few lines: the counts, then the first rejections and errors ("and N more")."""
        counts = (
            f"WriteSummary: {self.accepted} accepted, {self.duplicates} duplicates, "
            f"{len(self.rejected)} rejected, {self.undelivered} undelivered"
            f" ({self.spooled} spooled), {self.replayed} replayed"
        )
        lines = [counts]
        if (
            self.events_stored
            or self.events_duplicate
            or self.events_refused
            or self.events_undelivered
            or self.events_replayed
        ):
            lines.append(
                f"  live run events: {self.events_stored} stored, {self.events_duplicate} "
                f"duplicates, {len(self.events_refused)} refused, {self.events_undelivered} "
                f"undelivered ({self.events_spooled} spooled), {self.events_replayed} replayed"
            )
        lines += [f"  {line}" for line in self.spool_damage]
        lines += [
            f"  rejected {r.agent_run_id or '(no id)'}: {r.reason}: {r.message[:200]}"
            for r in self.rejected[: self.SHOWN]
        ]
        if len(self.rejected) > self.SHOWN:
            lines.append(f"  ... and {len(self.rejected) - self.SHOWN} more rejected")
        lines += [
            f"  refused event {e.agent_run_id}#{e.sequence}: {e.code}: {e.message[:200]}"
            for e in self.events_refused[: self.SHOWN]
        ]
        if len(self.events_refused) > self.SHOWN:
            lines.append(f"  ... and {len(self.events_refused) - self.SHOWN} more refused events")
        lines += [f"  error: {e[:200]}" for e in self.errors[: self.SHOWN]]
        if len(self.errors) > self.SHOWN:
            lines.append(f"  ... and {len(self.errors) - self.SHOWN} more errors")
        return "\n".join(lines)


@dataclass
class _Item:
    run_id: str
    data: bytes
    collection: bytes
    segment: Segment | None = None


class _Buffer:
    """The bounded FIFO between callers and upload workers; hands out whole batches."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[_Item] = deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self.draining = False  # no more lingering: partial batches go at once
        self.stopped = False

    def put(self, items: Sequence[_Item], block: bool = True) -> list[_Item]:
        """Append items, waiting for room while full (never when `block` is false). Return those
        refused because the buffer stopped meanwhile: no worker would ever take them."""
        with self._cond:
            for i, item in enumerate(items):
                while block and 0 < self._maxsize <= len(self._items) and not self.stopped:
                    # Full of runs this very call added: the takers must hear of them first.
                    self._cond.notify_all()
                    self._cond.wait()
                if self.stopped:
                    return list(items[i:])
                self._items.append(item)
            self._cond.notify_all()
        return []

    def take(self, max_count: int, max_bytes: int, linger_seconds: float) -> list[_Item]:
        """The next batch: up to `max_count` runs and about `max_bytes`, waiting at most
        `linger_seconds` after its first run for more. Empty once stopped."""
        batch: list[_Item] = []
        size = 0
        with self._cond:
            while not self._items and not self.stopped:
                self._cond.wait()
            deadline = time.monotonic() + linger_seconds
            while not self.stopped:
                while self._items and len(batch) < max_count:
                    if batch and size + len(self._items[0].data) > max_bytes:
                        max_count = len(batch)  # full by bytes
                        break
                    item = self._items.popleft()
                    batch.append(item)
                    size += len(item.data)
                remaining = deadline - time.monotonic()
                if len(batch) >= max_count or self.draining or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._cond.notify_all()
        return batch

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def clear(self) -> list[_Item]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        return items


class AgentRunWriter:
    """Uploads runs in the background, as Docent's `AgentRunWriter` does, over gRPC.

    Batches close on `batch_size` runs, `max_batch_bytes` encoded bytes, or `flush_interval`
    seconds after their first run, whichever comes first; `num_workers` streams upload at once.
    Failed uploads are retried with jittered exponential backoff, waiting as long as the server's
    RetryInfo says; a batch over the server's message limit is split in halves.

    Args:
        collection_id: The collection to write to (the only argument taken by position).
        server_url: The ingestion server (`host:port`, `grpcs://host:port`); None uses the
            connection's, else $AGENTRUN_SERVER, else 127.0.0.1:50051.
        api_key: Sent as `authorization: Bearer <key>` on every call (a server run with
            `--auth keys` needs one with the `ingest` scope); None uses the connection's, else
            $AGENTRUN_API_KEY.
        connection: TLS, client certificate, metadata, keepalive (see `Connection`); None: from
            the environment.
        num_workers: Concurrent upload streams.
        queue_maxsize: Runs queued at most; `log_agent_runs` blocks while full. <= 0: unbounded.
        flush_interval: Seconds a partial batch waits for more runs before it is sent.
        batch_size: Most runs per batch (the server accepts up to its max_runs_per_message).
        shutdown_timeout: Seconds `finish()` waits for queued and in-flight runs.
        max_batch_bytes: Most encoded bytes per batch (keep it under the server's max message).
        spool_dir: A directory to keep runs and live run events in until the server acks them
            (see `agentrun._spool`, `agentrun._event_spool`); a writer started on it first sends
            what an earlier one left. None: memory only.
        spool_fsync: fsync each spool segment and each live run event, so they survive power
            loss too (not only a crash); an fsync per `append` costs a disk flush.
        compression: "gzip" to compress uploads (worth it on slow links; costs CPU), or None.
        max_pending_events: Live run events (`live_run`) unacknowledged at most; `append` blocks
            while this many are.
        on_rejected: Called (from a writer thread) with each run the server rejects.
        backoff: The retry schedule.
        request_timeout: Seconds one upload call may take, as Docent's `request_timeout`.
        max_retries: Attempts at most per batch, as Docent's (its backoff's `max_tries`); a batch
            that fails them all is undelivered. None: retry until `finish()`'s
            `shutdown_timeout` (and, with `spool_dir`, keep it for the next writer).

    Raises:
        SpoolError: `spool_dir` cannot be created or is held by another writer.
        ValueError: a count or size option is below 1, or an unknown compression.
        TypeError: more than the collection id given by position (Docent's order was
            (api_key, collection_id, server_url)); the message shows the keyword form.
    """

    def __init__(
        self,
        collection_id: str,
        *positional: object,
        server_url: str | None = None,
        api_key: str | None = None,
        connection: Connection | None = None,
        num_workers: int = 2,
        queue_maxsize: int = 20_000,
        flush_interval: float = 1.0,
        batch_size: int = 1_000,
        shutdown_timeout: float = 60,
        max_batch_bytes: int = 8 * 1024 * 1024,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_fsync: bool = False,
        compression: str | None = None,
        max_pending_events: int = 10_000,
        on_rejected: Callable[[RejectedRun], None] | None = None,
        backoff: Backoff | None = None,
        request_timeout: float = UPLOAD_TIMEOUT_SECONDS,
        max_retries: int | None = None,
    ) -> None:
        if positional:
            raise TypeError(
                "AgentRunWriter takes the collection id alone by position, the rest by keyword: "
                "AgentRunWriter(collection_id, server_url=..., api_key=...). (Docent's writer "
                "took (api_key, collection_id, server_url) by position; so a call in that order "
                "is refused here rather than send runs to the wrong place. The first argument is "
                "not shown: in that order it is an API key.)"
            )
        if (
            min(
                num_workers,
                batch_size,
                max_batch_bytes,
                max_pending_events,
                1 if max_retries is None else max_retries,
            )
            < 1
        ):
            raise ValueError(
                "num_workers, batch_size, max_batch_bytes, max_pending_events and max_retries "
                "must be at least 1"
            )
        if request_timeout <= 0:
            raise ValueError(f"request_timeout: seconds above 0, not {request_timeout}")
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.error: RpcError | None = None
        """The refusal that keeps this writer from ever delivering (an unknown collection, an
        unknown or revoked key, a key without the `ingest` scope), from the first upload the
        server answered so; logged then, and `log_agent_runs` raises it from then on."""
        if compression not in _COMPRESSION:
            raise ValueError(f"compression: choose gzip or None, not {compression!r}")
        self.collection_id = collection_id
        self.server_url = server_url
        self.connection = connection_of(server_url, api_key, connection)
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.shutdown_timeout = shutdown_timeout
        self.max_batch_bytes = max_batch_bytes
        self.backoff = backoff or Backoff()
        self.max_pending_events = max_pending_events
        self._collection = collection_id.encode()
        self._compression = _COMPRESSION[compression]
        self._metadata = self.connection.call_metadata()
        self._on_rejected = on_rejected
        self._buffer = _Buffer(queue_maxsize)
        self._summary = WriteSummary()
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._pending = 0  # logged or replayed, not yet settled
        self._stop = threading.Event()
        self._closed = False
        self._out_of_reach = False  # an outage was reported; said once, until it ends
        self._finished: WriteSummary | None = None
        self._spool = Spool(spool_dir, spool_fsync) if spool_dir is not None else None
        self._channel = self.connection.channel()
        self._upload = self._channel.stream_unary(
            UPLOAD_METHOD,
            request_serializer=None,  # requests are pre-encoded bytes
            response_deserializer=pb.UploadAgentRunsResponse.FromString,
        )
        self._events: EventSender | None = None
        self.unfinished_live_runs: tuple[str, ...] = ()
        """Live runs an earlier writer on the spool left unfinished with events unacknowledged
        (sent first by this writer): resume each with `live_run(agent_run_id=...)`."""
        if self._spool is not None:
            self._replay(self._spool)
            self._replay_events(self._spool)
        self._workers = [
            threading.Thread(target=self._work, name=f"agentrun-writer-{i}", daemon=True)
            for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()
        atexit.register(self._finish_at_exit)

    def _replay(self, spool: Spool) -> None:
        replayed = 0
        for segment, collection, runs in spool.replay():
            items: list[_Item] = []
            refused: list[tuple[_Item, str]] = []
            for data in runs:
                item = _Item("", data, collection, segment)
                try:  # spooled by an older SDK, or damaged: refused here, never sent
                    run, shallow = parse_agent_run(data)
                    item.run_id = run.id
                    check_agent_run(run, shallow=shallow)
                    items.append(item)
                except DecodeError:
                    refused.append((item, "a spooled run that does not decode; not sent"))
                except InvalidRun as exc:
                    refused.append((item, f"spooled run: {exc.field}: {exc.reason}; not sent"))
            replayed += len(items) + len(refused)
            self._pending += len(items) + len(refused)
            if refused:
                self._reject_here(refused)
            self._buffer.put(items, block=False)  # never block a constructor
            _metrics.WRITER_QUEUED_RUNS.inc(len(items))
        self._summary.spool_damage += spool.damage
        if replayed:
            self._summary.replayed = replayed
            _log.info("replaying %d unacknowledged runs from spool %s", replayed, spool.directory)

    def _replay_events(self, spool: Spool) -> None:
        """Send the live run events an earlier writer left unacknowledged, before any new one."""
        events: list[Event] = []
        for data in spool.events.replay():
            try:
                events.append(Event.decode(data))
            except DecodeError:  # a length-delimited record that is no event: never sent
                spool.events.damage.append("spool event log: an event that does not decode")
        self._summary.spool_damage += spool.events.damage
        last: dict[str, bool] = {}
        for event in events:
            last[event.agent_run_id] = event.finish
        self.unfinished_live_runs = tuple(run for run, finished in last.items() if not finished)
        if events or spool.events.unsettled:
            self._summary.events_replayed = len(events)
            _log.info("replaying %d unacknowledged live run events from spool", len(events))
            self._events = self._event_sender(events)

    def _event_sender(self, replayed: list[Event]) -> EventSender:
        journal = self._spool.events if self._spool is not None else None
        return EventSender(
            self._channel, self._metadata, self.max_pending_events, self.backoff, journal, replayed
        )

    # --- producer side --------------------------------------------------------------------------

    def log_agent_runs(self, agent_runs: Iterable[AgentRun | agent_run_pb2.AgentRun]) -> None:
        """Queue runs for upload; blocks only while the queue is full.

        Takes `AgentRun` models, or their wire form (`agentrun.v1.AgentRun` messages) as other
        tools may produce it. The iterable is consumed `batch_size` runs at a time, so a generator
        of any length streams through the bounded queue. With a spool, the runs are on disk when
        this returns.

        Raises:
            WriterClosedError: `finish()` was called, before this call or while it waited for
                room (the message says how many of its runs were queued).
            InvalidRunError: a run the server would refuse (its id or a transcript key is not
                a printable name, a value nests more than 20 levels deep, a metadata field is
                named `scores`, ...: the ingestion server's own checks, `agentrun.wire.checks`);
                raised here, in the caller, naming the run and field. The runs of earlier chunks
                are queued, none of its own chunk is, and nothing of it reaches the spool.
            TypeError: a run's metadata is not JSON-like (raised likewise).
            SpoolError: the spool could not be written; none of that chunk's runs were queued.
            RpcError: an earlier upload was refused in a way no upload of this writer escapes
                (`error`: an unknown collection, an unknown or revoked key, a missing scope).
        """
        runs = iter(agent_runs)
        queued = 0
        while chunk := list(itertools.islice(runs, self.batch_size)):
            if self.error is not None:
                raise RpcError(
                    self.error.code,
                    f"{self.error.details} (an upload of this writer was refused so; no run of "
                    f"it can be delivered, and this call queued {queued} runs)",
                )
            taken = self._log_chunk(chunk)
            queued += taken
            if taken < len(chunk):
                raise WriterClosedError(
                    "finish() was called while log_agent_runs() waited for room: the first"
                    f" {queued} runs of this call were queued, the rest were not"
                    + (" (those of its last chunk stay in the spool)" if self._spool else "")
                )

    def _log_chunk(self, chunk: list[AgentRun | agent_run_pb2.AgentRun]) -> int:
        """Queue one chunk; return how many of its runs were queued (all, unless finish() ended
        the writer while this waited for room)."""
        items = [self._encode(run) for run in chunk]
        with self._lock:
            if self._closed:
                raise WriterClosedError("log_agent_runs() after finish()")
        spool = self._spool  # finish() may let go of it meanwhile
        if spool is not None:
            segment = spool.append(self._collection, [item.data for item in items])
            for item in items:
                item.segment = segment
        with self._lock:
            self._pending += len(items)
        _metrics.WRITER_QUEUED_RUNS.inc(len(items))
        refused = self._buffer.put(items)
        if refused:  # finish() ended the writer meanwhile (say, from a signal handler)
            _metrics.WRITER_QUEUED_RUNS.dec(len(refused))
            with self._lock:
                self._pending = max(0, self._pending - len(refused))
                self._settled.notify_all()
        return len(items) - len(refused)

    def _encode(self, run: AgentRun | agent_run_pb2.AgentRun) -> _Item:
        if isinstance(run, agent_run_pb2.AgentRun):
            message, from_model = run, False
        else:
            message, from_model = agent_run_to_proto(run), True
        data = message.SerializeToString()
        try:
            check_agent_run(message, shallow=encodes_shallow(data), from_model=from_model)
        except InvalidRun as problem:
            raise InvalidRunError.of(problem) from None
        return _Item(message.id, data, self._collection)

    # --- shutdown -------------------------------------------------------------------------------

    def finish(self, force: bool = False) -> WriteSummary:
        """Stop accepting runs, wait for queued and in-flight ones, and report what became of all.

        Waits up to `shutdown_timeout` seconds (not at all with `force=True`); runs still queued
        or in flight then are cancelled and counted as undelivered (and, with a spool, stay in it
        for the next writer). Idempotent.
        """
        with self._lock:
            if self._finished is not None:  # a second call (`with writer:`, then finish())
                return self._finished
            self._closed = True
        self._buffer.draining = True
        self._buffer.wake()
        with self._lock:
            if not force:
                deadline = time.monotonic() + self.shutdown_timeout
                while self._pending and time.monotonic() < deadline:
                    self._settled.wait(deadline - time.monotonic())
        events, self._events = self._events, None
        if events is not None:
            left = events.stop(0 if force else self.shutdown_timeout)
            with self._lock:
                s = self._summary
                s.events_stored, s.events_duplicate = events.stored, events.duplicates
                s.events_refused = list(events.refused)
                s.events_undelivered = left
                s.events_spooled = left if self._spool is not None else 0
                if left and (events.fatal or events.last_error):
                    s.errors.append(
                        f"live run events undelivered: {events.fatal or events.last_error}"
                    )
            if left:
                _log.warning(
                    "agentrun writer: %d live run events not acknowledged at finish%s",
                    left,
                    " (kept in the spool)" if self._spool is not None else "",
                )
        self._stop.set()
        self._buffer.stopped = True
        self._buffer.wake()
        if self._pending:
            self._channel.close()  # cancels in-flight uploads
        for worker in self._workers:
            worker.join(timeout=5.0)
        abandoned = self._buffer.clear()
        _metrics.WRITER_QUEUED_RUNS.dec(len(abandoned))
        with self._lock:
            self._settle_undelivered(abandoned, "finish() before upload")
            self._pending = 0
            summary = self._summary
        self._channel.close()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        atexit.unregister(self._finish_at_exit)
        self._finished = summary
        if not summary.ok:
            _log.warning(
                "agentrun writer finished with %d rejected and %d undelivered runs (%d spooled)",
                len(summary.rejected),
                summary.undelivered,
                summary.spooled,
            )
        return summary

    def live_run(
        self,
        agent_run_id: str | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: BaseMetadata | Mapping[str, Any] | None = None,
    ) -> LiveRun:
        """A run that grows while the agent works, as Docent's `agent_run_context` and
        LangSmith's `RunTree` (post at start, patch at end) offer; here every step is durable once
        acknowledged, and visible to `GetAgentRun` and `agentrun tail` at once.

            with writer.live_run(name="task-17") as run:
                run.append("default", [UserMessage(content=...), AssistantMessage(content=...)])
                run.set_scores(reward=1.0)
            # leaving the block finishes the run (an exception: finished with `error` in metadata)

        `metadata` is what `AgentRun` takes: a `BaseAgentRunMetadata` (its `scores` become the
        run's scores), or Docent-style dict metadata, whose `scores` key does the same.

        With `agent_run_id` of a run that is not finished, its events continue after the ones
        stored and those still unacknowledged here (a process resuming its own run after a
        restart, or another's). With `spool_dir`, every event is on disk when `append` returns,
        and a writer started on the spool sends those not acknowledged before anything new: an
        agent killed mid-run resumes it by id with nothing lost. Events of all of a writer's live
        runs share one stream, in order; `append` blocks only while `max_pending_events` are
        unacknowledged. `finish()` waits for them within `shutdown_timeout`.

        Raises:
            WriterClosedError: after `finish()`.
            LiveRunError: the run is finished, or was uploaded whole.
            RpcError: the server cannot be reached to find where the run stands (only when
                resuming a run by id).
        """
        with self._lock:
            if self._closed:
                raise WriterClosedError("live_run() after finish()")
            if self._events is None:
                self._events = self._event_sender([])
            sender = self._events
        next_sequence = 1
        if agent_run_id is None:
            agent_run_id = str(uuid.uuid4())
        else:
            next_sequence = self._resume_point(agent_run_id, sender)
        run = LiveRun(sender, agent_run_id, self.collection_id, next_sequence)
        if next_sequence == 1 or name is not None or description is not None or metadata:
            run.open(name, description, metadata)
        return run

    def _resume_point(self, agent_run_id: str, sender: EventSender) -> int:
        """The run's next sequence number: after its events stored and those made here (or
        replayed from the spool) and not yet acknowledged."""
        made = sender.last_made(agent_run_id)
        if made is not None:
            sequence, finishes = made
            if finishes:
                raise LiveRunError(f"run {agent_run_id!r} is finished: it takes no more events")
            return sequence + 1
        stub = self._channel.unary_unary(
            "/agentrun.v1.IngestionService/GetAgentRun",
            request_serializer=pb.GetAgentRunRequest.SerializeToString,
            response_deserializer=pb.GetAgentRunResponse.FromString,
        )
        request = pb.GetAgentRunRequest(agent_run_id=agent_run_id, view=pb.AGENT_RUN_VIEW_BASIC)
        try:
            stored = stub(request, metadata=self._metadata, timeout=30, wait_for_ready=True)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                return 1
            raise RpcError.from_grpc(exc) from exc
        run = stored.agent_run
        if run.state == pb.AGENT_RUN_STATE_FINISHED:
            how = "uploaded whole" if run.event_count == 0 else "finished"
            raise LiveRunError(f"run {agent_run_id!r} is {how}: it takes no more events")
        return int(run.event_count) + 1

    def _finish_at_exit(self) -> None:
        if not self._closed:
            _log.warning("AgentRunWriter.finish() was not called; flushing at exit")
            self.finish()

    def __enter__(self) -> AgentRunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    # --- consumer side --------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._buffer.take(self.batch_size, self.max_batch_bytes, self.flush_interval)
            if batch:
                _metrics.WRITER_QUEUED_RUNS.dec(len(batch))
                self._deliver(batch)

    def _requests(self, batch: list[_Item]) -> Iterator[bytes]:
        start = 0
        for end in range(1, len(batch) + 1):  # one message per run of equal collections
            if end == len(batch) or batch[end].collection != batch[start].collection:
                yield encode_upload_request(
                    batch[start].collection, (item.data for item in batch[start:end])
                )
                start = end

    def _deliver(self, batch: list[_Item]) -> None:
        attempt = 0
        while True:
            _metrics.WRITER_SENT_BYTES.inc(sum(len(item.data) for item in batch))
            try:
                # Not wait_for_ready: a server out of reach fails the call at once (UNAVAILABLE),
                # so the writer says so and retries on its schedule instead of hanging silent.
                response = self._upload(
                    self._requests(batch),
                    timeout=self.request_timeout,
                    wait_for_ready=False,
                    metadata=self._metadata,
                    compression=self._compression,
                )
            except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!"
                with self._lock:
                    self._settle_undelivered(batch, f"finish() cut the upload off: {exc}")
                return
            except grpc.RpcError as exc:
                failure = Failure.of(exc)
                verdict = failure.verdict()
                if verdict is Verdict.SPLIT:
                    if len(batch) > 1:
                        middle = len(batch) // 2
                        _log.info("%s; splitting a batch of %d runs", failure, len(batch))
                        self._deliver(batch[:middle])
                        self._deliver(batch[middle:])
                        return
                    self._reject_alone(batch[0], failure)
                    return
                tries_left = self.max_retries is None or attempt + 1 < self.max_retries
                if verdict is Verdict.RETRY and tries_left and not self._stop.is_set():
                    attempt += 1
                    delay = self.backoff.delay(attempt, failure.retry_after_seconds)
                    self._log_retry(failure, len(batch), attempt, delay)
                    if not self._stop.wait(delay):
                        _metrics.WRITER_RETRIES.inc()
                        continue
                with self._lock:
                    self._settle_undelivered(batch, str(failure))
                    known = self.error is not None
                    if not known and failure.code in _NEVER_DELIVERS:
                        self.error = RpcError(failure.code, failure.details)
                _log.log(
                    logging.DEBUG if known else logging.ERROR,
                    "upload of %d runs failed for good: %s",
                    len(batch),
                    failure,
                )
                return
            if self._out_of_reach:
                self._out_of_reach = False
                _log.info("the agentrun server is reachable again; delivering")
            self._record(batch, response)
            return

    def _log_retry(self, failure: Failure, runs: int, attempt: int, delay: float) -> None:
        """Say once that the server is out of reach (not at every retry of every batch)."""
        if failure.code is not grpc.StatusCode.UNAVAILABLE:
            _log.info(
                "upload of %d runs failed (%s); retry %d in %.2f s", runs, failure, attempt, delay
            )
            return
        with self._lock:
            first, self._out_of_reach = not self._out_of_reach, True
        if first:
            target = self.connection.target
            _log.warning(
                "cannot reach the agentrun server at %s (%s); retrying in the background, the runs "
                "are kept%s",
                target,
                tls_mismatch(self.connection) or failure.details,
                " (and spooled)" if self._spool is not None else "",
            )
        else:
            _log.debug("upload of %d runs: retry %d in %.2f s (%s)", runs, attempt, delay, failure)

    def _reject_alone(self, item: _Item, failure: Failure) -> None:
        """A single run over the server's message limit: no split can help it."""
        response = pb.UploadAgentRunsResponse()
        response.rejected.add(
            index=0,
            agent_run_id=item.run_id,
            reason=pb.REJECTION_REASON_TOO_LARGE,
            message=f"run is {len(item.data)} bytes encoded; the server refused it: {failure}",
        )
        self._record([item], response)

    def _reject_here(self, refused: Sequence[tuple[_Item, str]]) -> None:
        """Settle runs that can never be stored as rejected INVALID, without sending them."""
        response = pb.UploadAgentRunsResponse()
        for index, (item, message) in enumerate(refused):
            response.rejected.add(
                index=index,
                agent_run_id=item.run_id,
                reason=pb.REJECTION_REASON_INVALID,
                message=message,
            )
        self._record([item for item, _ in refused], response)

    def _record(self, batch: list[_Item], response: pb.UploadAgentRunsResponse) -> None:
        rejected = [
            RejectedRun(
                batch[r.index].run_id if r.index < len(batch) else r.agent_run_id,
                pb.RejectionReason.Name(r.reason).removeprefix("REJECTION_REASON_"),
                r.message,
            )
            for r in response.rejected
        ]
        if self._spool is not None:
            for segment, count in _by_segment(batch):
                self._spool.settle(segment, count)
        with self._lock:
            s = self._summary
            s.accepted += response.accepted_count
            s.duplicates += response.duplicate_count
            s.rejected += rejected
            self._pending -= len(batch)
            self._settled.notify_all()
        _metrics.WRITER_RUNS.labels("accepted").inc(response.accepted_count)
        _metrics.WRITER_RUNS.labels("duplicate").inc(response.duplicate_count)
        _metrics.WRITER_RUNS.labels("rejected").inc(len(rejected))
        for run in rejected:
            _log.warning("run %s rejected: %s: %s", run.agent_run_id, run.reason, run.message)
            if self._on_rejected is not None:
                self._on_rejected(run)

    def _settle_undelivered(self, items: Sequence[_Item], why: str) -> None:
        """Count runs as undelivered (the caller holds the lock); spooled ones stay on disk."""
        if not items:
            return
        s = self._summary
        s.undelivered += len(items)
        s.spooled += sum(1 for item in items if item.segment is not None)
        s.errors.append(why)
        _metrics.WRITER_RUNS.labels("undelivered").inc(len(items))
        _metrics.WRITER_DROPPED_RUNS.inc(len(items))
        self._pending -= len(items)
        self._settled.notify_all()


def _by_segment(batch: Sequence[_Item]) -> Iterator[tuple[Segment, int]]:
    counts: dict[int, tuple[Segment, int]] = {}
    for item in batch:
        if item.segment is not None:
            segment, count = counts.get(id(item.segment), (item.segment, 0))
            counts[id(item.segment)] = (segment, count + 1)
    return iter(counts.values())


def init(
    collection_name: str = "Agent Run Collection",
    collection_id: str | None = None,
    server_url: str | None = None,
    web_url: str | None = None,
    api_key: str | None = None,
    workflow: str | None = None,
    connection: Connection | None = None,
    enter_workflow_on_abandon: bool = False,
    **writer_options: object,
) -> AgentRunWriter:
    """Return a writer for a collection, as `docent.init` does (same arguments, same order).

    With no `collection_id`, the collection named `collection_name` is created (or reused: names
    are unique), bound to `workflow` if given, so each run written enters its first stage (a
    live run when it finishes, or with `enter_workflow_on_abandon` also when it is abandoned).
    `writer_options` go to `AgentRunWriter` (num_workers, batch_size, spool_dir, ...);
    `connection` carries TLS and the rest of `Connection` (agentrun's own, after Docent's).
    `web_url` (Docent's dashboard, for the links it logs) is accepted and not used: agentrun has
    no web UI; a notice says so once.

    Raises:
        RpcError: the server is unreachable, the collection or workflow does not exist, or the
            collection is bound to another workflow.
    """
    if web_url is not None:
        _log.info(
            "init(web_url=...) is Docent's dashboard address; agentrun has none, so it is not used"
        )
    with Client(server_url, api_key=api_key, connection=connection) as client:
        if collection_id is None:
            collection_id = client.create_collection(
                collection_name,
                workflow=workflow or "",
                enter_workflow_on_abandon=enter_workflow_on_abandon,
            ).collection.id
        else:
            try:
                client.get_collection(collection_id)
            except RpcError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                known = ", ".join(f"{c.name!r} ({c.id})" for c in client.list_collections())
                raise RpcError(
                    exc.code,
                    f"init(collection_id={collection_id!r}): no such collection; "
                    f"collections: {known or 'none yet'} (or pass collection_name to create one)",
                ) from exc
    return AgentRunWriter(
        collection_id,
        server_url=server_url,
        api_key=api_key,
        connection=connection,
        **writer_options,  # type: ignore[arg-type]
    )
