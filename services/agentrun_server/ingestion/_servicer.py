"""The IngestionService servicer: converts between the wire and storage, enforces the limits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.v1 import ingestion_service_pb2_grpc as pb_grpc
from agentrun.wire.checks import parse_agent_run
from agentrun.wire.framing import RawUpload, decode_upload_request
from agentrun.wire.limits import MAX_DESCRIPTION_BYTES
from agentrun_server._checks import (
    check_count,
    check_enum,
    check_name,
    check_reference,
    check_text,
    storable_text,
)
from agentrun_server._errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
)
from agentrun_server.auth import Access, caller
from agentrun_server.ingestion._cleanup import MAX_DELETE_IDS, Cleanup, check_retention
from agentrun_server.ingestion._facets import checked_filters, facets_of_run
from agentrun_server.ingestion._live import checked_event, fold_finished, fold_run
from agentrun_server.ingestion._metrics import IngestionMetrics
from agentrun_server.ingestion._validate import InvalidRun, validate_agent_run
from agentrun_server.ingestion._watchers import RunWatchers
from agentrun_server.serving import (
    IdleTimeout,
    StreamSlots,
    add_service,
    epoch_seconds,
    page_after,
    page_size,
    peer_host,
    receive,
    status_for,
    to_timestamp,
)
from agentrun_server.storage import (
    Collection,
    EventStatus,
    InsertStatus,
    LiveRunCounts,
    LocalNotifier,
    NewEvent,
    NewRun,
    Notifier,
    RunQuery,
    Storage,
    StoredRun,
    run_state,
)

_VIEWS = pb.AgentRunView.values()
_NO_LIVE_RUNS = LiveRunCounts(0, 0)

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class IngestionLimits:
    """Limits of the ingestion service. Over one, the client gets a status naming it."""

    max_message_bytes: int = 17 * 1024 * 1024
    """Largest request message, after decompression (gRPC answers RESOURCE_EXHAUSTED above):
    room for one run at max_run_bytes. Each stream reserves this much of max_pending_bytes
    before it reads a message (gRPC holds a whole message in memory once asked to read it), so
    the pair bounds the memory that uploads can take."""
    max_runs_per_message: int = 1000
    """Most runs in one UploadAgentRuns message (INVALID_ARGUMENT above, nothing of it stored)."""
    max_run_bytes: int = 16 * 1024 * 1024
    """Largest encoded run; a larger one is rejected on its own (TOO_LARGE), the batch lands."""
    max_upload_streams: int = 64
    """Upload streams open at once; one more is answered RESOURCE_EXHAUSTED with RetryInfo."""
    max_upload_streams_per_peer: int = 32
    """Upload streams open at once from one client host (its IP address), so that one host
    cannot hold every slot; one more is answered RESOURCE_EXHAUSTED with RetryInfo."""
    max_upload_streams_per_key: int = 32
    """Upload streams open at once under one API key (hosts behind one NAT share an address)."""
    first_message_seconds: float = 10.0
    """An upload or event stream whose first message does not arrive within this is closed
    (DEADLINE_EXCEEDED): a stream that never starts gives its slot back."""
    stream_idle_seconds: float = 30.0
    """An upload or event stream that delivers no message for this long is closed
    (DEADLINE_EXCEEDED; what its earlier messages carried stays stored), so that idle streams
    cannot hold the slots. The SDK's writer closes an event stream with nothing to send first."""
    max_pending_bytes: int = 128 * 1024 * 1024
    """Bytes of upload messages in memory, over all streams: reserved (max_message_bytes) while a
    message is being received, then its real size until it is committed. A stream finding no
    room reads nothing (HTTP/2 flow control holds the client back) for up to
    `admission_wait_seconds`, then is answered RESOURCE_EXHAUSTED with RetryInfo."""
    max_pending_bytes_per_peer: int = 48 * 1024 * 1024
    """The part of max_pending_bytes that one client host may hold, so that no host, however
    many streams it opens, takes all of it."""
    admission_wait_seconds: float = 5.0
    """How long a stream waits for room under `max_pending_bytes` before its next message."""
    retry_after_seconds: float = 1.0
    """The delay RetryInfo asks of a client turned away by the two limits above."""
    max_live_run_bytes: int = 256 * 1024 * 1024
    """Most bytes of events one live run may take (it grows past max_run_bytes up to this); an
    event beyond it is refused RESOURCE_EXHAUSTED."""
    live_run_timeout_seconds: float = field(
        default=3600.0, metadata={"aliases": ("--live-run-timeout",)}
    )
    """A live run with no event for this long reads as abandoned; its next event reopens it."""
    otlp_quiet_seconds: float = 30.0
    """An OpenTelemetry trace's run finishes once its root span has ended and no span of it has
    come for this long (the spans of one trace may come from several processes)."""
    retention_sweep_seconds: float = 300.0
    """How often this server deletes the runs past their collection's `retention_days` (every
    replica may; each run is deleted once)."""
    max_event_streams: int = 2048
    """StreamAgentRunEvents streams open at once in all (one per writer with events to send)."""
    max_event_streams_per_peer: int = 256
    """StreamAgentRunEvents streams open at once from one client host."""
    max_event_streams_per_key: int = 1024
    """StreamAgentRunEvents streams open at once under one API key."""
    max_watch_streams: int = 2048
    """WatchAgentRun streams open at once in all (a watcher of a quiet run costs no reads, but
    holds a slot)."""
    max_watch_streams_per_peer: int = 256
    """WatchAgentRun streams open at once from one client host."""
    max_watch_streams_per_key: int = 1024
    """WatchAgentRun streams open at once under one API key."""


class _PendingBytes:
    """Bytes of upload messages in memory, in all and per client host. A reservation bigger than
    what is left is granted when nothing else is held (in all, or by that host)."""

    def __init__(self, limit: int, per_peer: int) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self.used = 0
        self._by_peer: dict[str, int] = {}
        self._room = asyncio.Condition()

    def _fits(self, peer: str, size: int) -> bool:
        mine = self._by_peer.get(peer, 0)
        return (not self.used or self.used + size <= self.limit) and (
            not mine or mine + size <= self.per_peer
        )

    async def acquire(self, peer: str, size: int, wait_seconds: float) -> bool:
        async with self._room:
            try:
                async with asyncio.timeout(wait_seconds):  # wait_for can swallow a cancellation
                    await self._room.wait_for(lambda: self._fits(peer, size))
            except TimeoutError:
                return False
            self.used += size
            self._by_peer[peer] = self._by_peer.get(peer, 0) + size
            return True

    async def release(self, peer: str, size: int) -> None:
        if not size:
            return
        async with self._room:
            self.used -= size
            left = self._by_peer[peer] - size
            if left:
                self._by_peer[peer] = left
            else:
                del self._by_peer[peer]
            self._room.notify_all()

    def held_by(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)


def collection_to_proto(
    collection: Collection, live: LiveRunCounts = _NO_LIVE_RUNS
) -> pb.Collection:
    """The wire form of a collection (a description stored before its limit, clipped to it),
    with its `live` runs' counts."""
    return pb.Collection(
        running_count=live.running,
        abandoned_count=live.abandoned,
        id=collection.id,
        name=collection.name,
        description=collection.description[:MAX_DESCRIPTION_BYTES],
        workflow=collection.workflow,
        create_time=to_timestamp(collection.created_at),
        run_count=collection.run_count,
        enter_workflow_on_abandon=collection.enter_on_abandon,
        retention_days=collection.retention_days,
    )


_STATES = {
    "running": pb.AGENT_RUN_STATE_RUNNING,
    "finished": pb.AGENT_RUN_STATE_FINISHED,
    "abandoned": pb.AGENT_RUN_STATE_ABANDONED,
}
_STATE_NAMES: dict[int, str] = {value: name for name, value in _STATES.items()}
_STATE_VALUES = tuple(pb.AgentRunState.values())


def _stored_run_to_proto(run: StoredRun, view: int, abandoned_before: float) -> pb.StoredAgentRun:
    state = run_state(run.state, run.updated_at, abandoned_before)
    out = pb.StoredAgentRun(
        collection_id=run.collection_id,
        ingest_time=to_timestamp(run.ingested_at),
        state=_STATES[state],
        update_time=to_timestamp(run.updated_at if run.updated_at is not None else run.ingested_at),
        event_count=max(run.next_sequence - 1, 0),
    )
    if run.state != "finished":  # a live run as it stands, folded from its events
        out.agent_run.CopyFrom(fold_run(run.id, run.parts))
        out.message_count = sum(len(t.messages) for t in out.agent_run.transcripts)
        if view == pb.AGENT_RUN_VIEW_BASIC:
            out.agent_run.ClearField("transcripts")
            out.agent_run.ClearField("metadata")
    elif view == pb.AGENT_RUN_VIEW_BASIC:
        full = run_pb.AgentRun.FromString(run.data)
        out.message_count = sum(len(t.messages) for t in full.transcripts)
        out.agent_run.id = full.id
        if full.HasField("name"):
            out.agent_run.name = full.name
        if full.HasField("description"):
            out.agent_run.description = full.description
        for key, score in full.scores.items():
            out.agent_run.scores[key].CopyFrom(score)
    else:
        out.agent_run.MergeFromString(run.data)
        out.message_count = sum(len(t.messages) for t in out.agent_run.transcripts)
    return out


WATCH_BATCH = 500
"""Most events in one WatchAgentRun response."""

_STATUS_LABELS = {
    pb.EVENT_STATUS_STORED: "stored",
    pb.EVENT_STATUS_DUPLICATE: "duplicate",
    pb.EVENT_STATUS_REFUSED: "refused",
}
_EVENT_STATUS = {
    EventStatus.STORED: pb.EVENT_STATUS_STORED,
    EventStatus.DUPLICATE: pb.EVENT_STATUS_DUPLICATE,
}


def _refused_ack(
    run_id: str, sequence: int, error: ServerError, next_sequence: int
) -> pb.AgentRunEventAck:
    return pb.AgentRunEventAck(
        agent_run_id=run_id[:300],
        sequence=sequence,
        status=pb.EVENT_STATUS_REFUSED,
        code=status_for(error).value[0],
        message=str(error),
        next_sequence=next_sequence,
    )


class IngestionServicer(pb_grpc.IngestionServiceServicer):
    """Serves `agentrun.v1.IngestionService` over a `Storage`."""

    def __init__(
        self,
        storage: Storage,
        metrics: IngestionMetrics,
        limits: IngestionLimits | None = None,
        on_runs_stored: Callable[[], None] | None = None,
        access: Access | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """Serve over `storage`; `on_runs_stored` is called after a batch stores new runs (the
        orchestrator in the same process passes its wake-up, since new runs may enter a workflow);
        `access` checks keys' limits (shared with the orchestrator); `notifier` carries "events
        landed" between server processes (the server's one notifier, started by the server).
        """
        self._storage = storage
        self._metrics = metrics
        self.limits = limits or IngestionLimits()
        self._on_runs_stored = on_runs_stored
        limits = self.limits
        self._slots = StreamSlots(
            "upload streams",
            ("max_upload_streams", limits.max_upload_streams),
            ("max_upload_streams_per_peer", limits.max_upload_streams_per_peer),
            limits.retry_after_seconds,
            ("max_upload_streams_per_key", limits.max_upload_streams_per_key),
        )
        self._event_slots = StreamSlots(
            "event streams",
            ("max_event_streams", limits.max_event_streams),
            ("max_event_streams_per_peer", limits.max_event_streams_per_peer),
            limits.retry_after_seconds,
            ("max_event_streams_per_key", limits.max_event_streams_per_key),
        )
        self._watch_slots = StreamSlots(
            "watch streams",
            ("max_watch_streams", limits.max_watch_streams),
            ("max_watch_streams_per_peer", limits.max_watch_streams_per_peer),
            limits.retry_after_seconds,
            ("max_watch_streams_per_key", limits.max_watch_streams_per_key),
        )
        # Watchers wake when their runs get events: here at once, elsewhere through the notifier.
        self._watchers = RunWatchers()
        self._notifier = notifier or LocalNotifier()
        self._notifier.subscribe(
            on_events=self._watchers.wake, events_wanted=lambda: self._watchers.wanted
        )
        self._pending = _PendingBytes(
            self.limits.max_pending_bytes, self.limits.max_pending_bytes_per_peer
        )
        self._access = access or Access(storage)
        self._cleanup = Cleanup(storage, metrics)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve this servicer on `server`; uploads are decoded by `decode_upload_request`."""
        add_service(
            server,
            self,
            pb.DESCRIPTOR.services_by_name["IngestionService"],
            {"UploadAgentRuns": decode_upload_request},
        )

    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: Context
    ) -> pb.CreateCollectionResponse:
        name = check_name("name", request.name)
        await self._access.check("name", create=(name, request.workflow))
        collection, created = await self._storage.create_collection(
            name,
            check_text("description", request.description),
            check_reference("workflow", request.workflow),
            time.time(),
            enter_on_abandon=request.enter_workflow_on_abandon,
            retention_days=check_retention("retention_days", request.retention_days),
        )
        return pb.CreateCollectionResponse(
            collection=collection_to_proto(collection), created=created
        )

    async def GetCollection(
        self, request: pb.GetCollectionRequest, context: Context
    ) -> pb.GetCollectionResponse:
        collection = await self._selected_collection(request)
        live = await self._storage.count_live_runs(self._abandoned_before())
        return pb.GetCollectionResponse(
            collection=collection_to_proto(collection, live.get(collection.id, _NO_LIVE_RUNS))
        )

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: Context
    ) -> pb.ListCollectionsResponse:
        principal = caller()
        collections = [
            c
            for c in await self._storage.list_collections()
            if principal.sees_collection(c.name, c.workflow)
        ]
        live = await self._storage.count_live_runs(self._abandoned_before())
        return pb.ListCollectionsResponse(
            collections=[collection_to_proto(c, live.get(c.id, _NO_LIVE_RUNS)) for c in collections]
        )

    async def UploadAgentRuns(  # type: ignore[override]  # requests arrive as RawUpload (_wire)
        self, request_iterator: AsyncIterator[RawUpload], context: Context
    ) -> pb.UploadAgentRunsResponse:
        """Store each message's runs in one transaction, answering per run (partial success).

        Raises:
            InvalidArgument: a message is malformed, lacks collection_id, or is over
                max_runs_per_message (runs of earlier messages in the stream stay stored).
            ResourceExhausted: with RetryInfo: over max_upload_streams (in all, or from this
                client host), or no room under max_pending_bytes (in all, or for this client
                host) within admission_wait_seconds.
            DeadlineExceeded: no message for stream_idle_seconds.
            NotFound: no such collection.
        """
        response = pb.UploadAgentRunsResponse()
        index = 0
        peer = peer_host(context.peer())
        with self._slots.slot(context.peer(), caller().name):
            self._metrics.open_streams.inc()
            try:
                requests = aiter(request_iterator)
                first = True
                while True:
                    request = await self._receive(requests, peer, response.accepted_count, first)
                    first = False
                    if request is None:
                        break
                    try:
                        await self._upload_batch(request, index, response)
                    finally:
                        await self._pending.release(peer, request.size)
                    index += len(request.runs)
            finally:
                self._metrics.open_streams.dec()
        return response

    async def _receive(
        self, requests: AsyncIterator[RawUpload], peer: str, stored: int, first: bool
    ) -> RawUpload | None:
        """The stream's next message, read only once max_message_bytes of room is reserved for
        it (gRPC buffers a whole message when asked for one); the reservation shrinks to the
        message's size, held until the caller releases it. None at the end of the stream."""
        limits = self.limits
        reserved = limits.max_message_bytes
        if not await self._pending.acquire(peer, reserved, limits.admission_wait_seconds):
            mine = self._pending.held_by(peer)
            raise ResourceExhausted(
                f"ingestion is behind: {self._pending.used:,} bytes of uploads in memory "
                f"({mine:,} from client host {peer}), at max_pending_bytes="
                f"{limits.max_pending_bytes} (max_pending_bytes_per_peer="
                f"{limits.max_pending_bytes_per_peer}); retry later",
                limits.retry_after_seconds,
            )
        request = None
        try:
            if first:
                request = await receive(
                    requests,
                    min(limits.first_message_seconds, limits.stream_idle_seconds),
                    "first_message_seconds: an upload stream's first message comes at once",
                )
            else:
                request = await receive(
                    requests,
                    limits.stream_idle_seconds,
                    f"stream_idle_seconds; {stored} runs of this upload stored; send each batch "
                    "on a stream of its own",
                )
        finally:
            await self._pending.release(peer, reserved - (request.size if request else 0))
        return request

    async def _upload_batch(
        self, request: RawUpload, first_index: int, response: pb.UploadAgentRunsResponse
    ) -> None:
        limits = self.limits
        if request.error is not None:
            raise InvalidArgument(request.error)
        if not request.collection_id:
            raise InvalidArgument("collection_id: required in every UploadAgentRunsRequest")
        check_reference("collection_id", request.collection_id)
        await self._access.check("collection_id", collection_id=request.collection_id)
        count = len(request.runs)
        if count > limits.max_runs_per_message:
            raise InvalidArgument(
                f"agent_runs: {count} runs in one message exceeds max_runs_per_message="
                f"{limits.max_runs_per_message}; split the batch"
            )
        self._metrics.batch_runs.observe(count)
        self._metrics.received_runs.inc(count)
        runs: list[NewRun] = []
        positions: list[tuple[int, str]] = []
        received_bytes = 0
        for offset, data in enumerate(request.runs):
            index = first_index + offset
            received_bytes += len(data)
            new_run = self._checked(data, index, response)
            if new_run is not None:
                runs.append(new_run)
                positions.append((index, new_run.id))
        self._metrics.received_bytes.inc(received_bytes)
        if not runs:
            return
        started = time.perf_counter()
        outcomes = await self._storage.insert_runs(request.collection_id, runs, time.time())
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        accepted = duplicates = stored_bytes = 0
        for (index, run_id), new_run, outcome in zip(positions, runs, outcomes, strict=True):
            if outcome.status is InsertStatus.ACCEPTED:
                accepted += 1
                stored_bytes += len(new_run.data)
            elif outcome.status is InsertStatus.DUPLICATE:
                duplicates += 1
            else:
                # The other collection is named only to a key that may see it.
                other = outcome.existing_collection_id or ""
                where = f" ({other})" if await self._access.sees_collection(other) else ""
                self._reject(
                    response,
                    index,
                    run_id,
                    pb.REJECTION_REASON_CONFLICT,
                    "id",
                    f"id: a run with id {run_id!r} is stored in another collection{where}",
                )
        response.accepted_count += accepted
        response.duplicate_count += duplicates
        self._metrics.stored_runs.inc(accepted)
        self._metrics.stored_bytes.inc(stored_bytes)
        self._metrics.duplicate_runs.inc(duplicates)
        if accepted and self._on_runs_stored is not None:
            self._on_runs_stored()

    def _checked(
        self, data: memoryview | bytes, index: int, response: pb.UploadAgentRunsResponse
    ) -> NewRun | None:
        """The run to store, or None with its rejection added to `response`. The decoded message
        (several times the run's size in memory) is dropped on return, before the commit."""
        limits = self.limits
        try:
            run, shallow = parse_agent_run(data)
        except DecodeError:
            self._reject(
                response,
                index,
                "",
                pb.REJECTION_REASON_INVALID,
                "",
                f"agent_runs[{index}]: not a valid encoded agentrun.v1.AgentRun",
            )
            return None
        if len(data) > limits.max_run_bytes:
            self._reject(
                response,
                index,
                run.id,
                pb.REJECTION_REASON_TOO_LARGE,
                "",
                f"run is {len(data)} bytes encoded, over max_run_bytes={limits.max_run_bytes}",
            )
            return None
        try:
            validate_agent_run(run, shallow=shallow)
        except InvalidRun as exc:
            self._reject(response, index, run.id, pb.REJECTION_REASON_INVALID, exc.field, str(exc))
            return None
        # The client's bytes are stored as sent: no re-encoding on the hot path.
        name = storable_text(run.name) if run.HasField("name") else None
        return NewRun(run.id, name, data, facets_of_run(run))

    def _reject(
        self,
        response: pb.UploadAgentRunsResponse,
        index: int,
        run_id: str,
        reason: pb.RejectionReason.ValueType,
        field: str,
        message: str,
    ) -> None:
        response.rejected.add(
            index=index,
            agent_run_id=run_id,
            reason=reason,
            field=field,
            message=message,
        )
        self._metrics.rejected_runs.labels(
            pb.RejectionReason.Name(reason).removeprefix("REJECTION_REASON_").lower()
        ).inc()

    async def StreamAgentRunEvents(
        self, request_iterator: AsyncIterator[pb.StreamAgentRunEventsRequest], context: Context
    ) -> AsyncIterator[pb.StreamAgentRunEventsResponse]:
        """Store each message's events in one transaction, answering each (see the proto).

        Raises:
            InvalidArgument: a message over max_runs_per_message events.
            ResourceExhausted: with RetryInfo, over max_event_streams_per_peer.
            Unauthenticated: the key was revoked while the stream was open.
        """
        limits = self.limits
        with self._event_slots.slot(context.peer(), caller().name):
            self._metrics.open_event_streams.inc()
            try:
                requests = aiter(request_iterator)
                request = await receive(
                    requests,
                    min(limits.first_message_seconds, limits.stream_idle_seconds),
                    "first_message_seconds: open an event stream when there is an event to send",
                )
                if request is None:
                    return
                yield await self._store_events(request)
                with IdleTimeout(
                    limits.stream_idle_seconds,
                    "stream_idle_seconds: close an event stream with nothing to send, and open "
                    "another for the next event",
                ) as idle:
                    async for request in requests:
                        idle.touch()
                        yield await self._store_events(request)
            finally:
                self._metrics.open_event_streams.dec()

    async def _store_events(
        self, request: pb.StreamAgentRunEventsRequest
    ) -> pb.StreamAgentRunEventsResponse:
        principal = caller()
        limit = self.limits.max_runs_per_message
        if len(request.events) > limit:
            raise InvalidArgument(
                f"events: {len(request.events)} in one message exceeds max_runs_per_message="
                f"{limit}; split the batch"
            )
        acks: list[pb.AgentRunEventAck | None] = []
        kept: list[NewEvent] = []
        for i, event in enumerate(request.events):
            try:
                new = checked_event(event, i)
                if principal.limited:
                    if not new.collection_id:
                        raise PermissionDenied(
                            f"events[{i}].collection_id: required on every event from a key "
                            "limited to collections or workflows"
                        )
                    await self._access.check(
                        f"events[{i}].collection_id", collection_id=new.collection_id
                    )
            except ServerError as error:
                acks.append(_refused_ack(event.agent_run_id, event.sequence, error, 0))
                continue
            acks.append(None)
            kept.append(new)
        started = time.perf_counter()
        outcomes = iter(
            await self._storage.append_events(
                kept, fold_finished, self.limits.max_live_run_bytes, time.time()
            )
            if kept
            else []
        )
        if kept:
            self._metrics.live_commit_seconds.observe(time.perf_counter() - started)
        response = pb.StreamAgentRunEventsResponse()
        finished = 0
        counts = {"stored": 0, "duplicate": 0, "refused": 0}
        stored = iter(kept)
        for ack in acks:
            if ack is None:
                new, outcome = next(stored), next(outcomes)
                finished += new.finish and outcome.status is EventStatus.STORED
                if outcome.error is not None:
                    ack = _refused_ack(
                        new.run_id, new.sequence, outcome.error, outcome.next_sequence
                    )
                else:
                    ack = pb.AgentRunEventAck(
                        agent_run_id=new.run_id,
                        sequence=new.sequence,
                        status=_EVENT_STATUS[outcome.status],
                        next_sequence=outcome.next_sequence,
                    )
            response.acks.append(ack)
            counts[_STATUS_LABELS[ack.status]] += 1
        for status, count in counts.items():
            if count:
                self._metrics.live_events.labels(status).inc(count)
        if finished:
            self._metrics.live_runs_finished.inc(finished)
        if finished and self._on_runs_stored is not None:
            self._on_runs_stored()
        if counts["stored"]:
            self._notifier.events_landed(
                list(
                    dict.fromkeys(
                        ack.agent_run_id
                        for ack in response.acks
                        if ack.status == pb.EVENT_STATUS_STORED
                    )
                )
            )
        return response

    async def WatchAgentRun(
        self, request: pb.WatchAgentRunRequest, context: Context
    ) -> AsyncIterator[pb.WatchAgentRunResponse]:
        """Send the run's events as they land (see the proto).

        Raises:
            NotFound: no such run.
            ResourceExhausted: with RetryInfo, over max_event_streams_per_peer watch streams.
        """
        run_id = check_reference("agent_run_id", request.agent_run_id, required=True)
        after = request.after_sequence
        checked = False
        sent_state = None
        timeout_seconds = self.limits.live_run_timeout_seconds
        with (
            self._watch_slots.slot(context.peer(), caller().name),
            self._watchers.watching(run_id) as woken,
        ):
            while True:
                woken.clear()  # before the read: an event landing during it wakes the next wait
                run, events = await self._storage.events_after(
                    run_id, after, WATCH_BATCH, self.limits.max_message_bytes // 2
                )
                if not checked:
                    await self._access.check("agent_run_id", collection_id=run.collection_id)
                    checked = True
                state = run_state(run.state, run.updated_at, self._abandoned_before())
                last = run.next_sequence - 1
                if events or state != sent_state:
                    # At most half the message limit of patches (the first event regardless),
                    # as pages of runs: a batch of big events would not send.
                    response = pb.WatchAgentRunResponse(state=_STATES[state])
                    for sequence, data in events:
                        event = response.events.add(
                            agent_run_id=run_id,
                            sequence=sequence,
                            finish=state == "finished" and sequence == last,
                        )
                        event.patch.MergeFromString(data)
                    yield response
                    sent_state = state
                if events:
                    after = events[-1][0]
                if state == "finished" and after >= last:
                    return
                if after < last:  # more stored than the page held
                    continue
                # Asleep until the run gets events, or until it would turn abandoned (a state
                # change no event announces): no reads while it is quiet.
                wake_in = None
                if state == "running":
                    quiet_since = run.updated_at or run.ingested_at
                    wake_in = max(0.0, quiet_since + timeout_seconds - time.time()) + 0.01
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wake_in):
                        await woken.wait()

    def _abandoned_before(self) -> float:
        return time.time() - self.limits.live_run_timeout_seconds

    async def GetAgentRun(
        self, request: pb.GetAgentRunRequest, context: Context
    ) -> pb.GetAgentRunResponse:
        run_id = check_reference("agent_run_id", request.agent_run_id, required=True)
        view = check_enum("view", request.view, _VIEWS)
        if view != pb.AGENT_RUN_VIEW_BASIC:
            # A live run may grow past what one answer may carry (gRPC would fail the send):
            # told from its stored size, before it is read.
            size = await self._storage.run_size(run_id)
            await self._access.check("agent_run_id", collection_id=size.collection_id)
            if size.size_bytes > self.limits.max_message_bytes - 4096:
                raise ResourceExhausted(
                    f"agent_run_id: run {run_id!r} is {size.size_bytes:,} bytes, over the "
                    f"{self.limits.max_message_bytes:,}-byte message limit: read it by its "
                    "events (WatchAgentRun from after_sequence 0), or view BASIC for its summary"
                )
        run = await self._storage.get_run(run_id)
        await self._access.check("agent_run_id", collection_id=run.collection_id)
        return pb.GetAgentRunResponse(
            agent_run=_stored_run_to_proto(run, view, self._abandoned_before())
        )

    async def ListAgentRuns(
        self, request: pb.ListAgentRunsRequest, context: Context
    ) -> pb.ListAgentRunsResponse:
        collection_id = check_reference("collection_id", request.collection_id, required=True)
        view = check_enum("view", request.view, _VIEWS)
        await self._storage.get_collection(id=collection_id)
        await self._access.check("collection_id", collection_id=collection_id)
        state = check_enum("state", request.state, _STATE_VALUES)
        after = page_after(request.page_token)
        size = page_size(request.page_size)
        abandoned_before = self._abandoned_before()
        query = RunQuery(
            collection_id,
            _STATE_NAMES.get(state),
            abandoned_before,
            checked_filters(request.filters),
            request.newest_first,
        )
        # Pages stay within half the message limit: fewer runs than asked when they are large.
        page, more = await self._storage.list_runs(
            query, after, size, self.limits.max_message_bytes // 2
        )
        return pb.ListAgentRunsResponse(
            agent_runs=[_stored_run_to_proto(r, view, abandoned_before) for r in page],
            next_page_token=str(page[-1].seq) if more else "",
        )

    async def _selected_collection(
        self,
        request: pb.GetCollectionRequest | pb.UpdateCollectionRequest | pb.DeleteCollectionRequest,
    ) -> Collection:
        """The collection a request's `selector` names, within the caller's limits."""
        selector = request.WhichOneof("selector")
        if selector is None:
            raise InvalidArgument("selector: set id or name")
        collection = await self._storage.get_collection(
            id=check_reference("id", request.id), name=check_reference("name", request.name)
        )
        await self._access.check(selector, collection=collection)
        return collection

    async def UpdateCollection(
        self, request: pb.UpdateCollectionRequest, context: Context
    ) -> pb.UpdateCollectionResponse:
        collection = await self._selected_collection(request)
        description = (
            check_text("description", request.description)
            if request.HasField("description")
            else None
        )
        retention = (
            check_retention("retention_days", request.retention_days)
            if request.HasField("retention_days")
            else None
        )
        updated = await self._cleanup.update_collection(collection, description, retention)
        return pb.UpdateCollectionResponse(collection=collection_to_proto(updated))

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: Context
    ) -> pb.DeleteCollectionResponse:
        collection = await self._selected_collection(request)
        tally = await self._cleanup.delete_collection(collection, request.force)
        return pb.DeleteCollectionResponse(**tally.counts())

    async def DeleteAgentRuns(
        self, request: pb.DeleteAgentRunsRequest, context: Context
    ) -> pb.DeleteAgentRunsResponse:
        by_age = bool(request.collection_id) or request.HasField("ingested_before")
        if bool(request.agent_run_ids) == by_age:
            raise InvalidArgument(
                "agent_run_ids: give run ids, or collection_id with ingested_before, not both "
                "nor neither (a whole collection: DeleteCollection)"
            )
        if request.agent_run_ids:
            run_ids = [
                check_reference(f"agent_run_ids[{i}]", run_id, required=True)
                for i, run_id in enumerate(
                    check_count("agent_run_ids", request.agent_run_ids, MAX_DELETE_IDS)
                )
            ]
            await self._access.check("agent_run_ids", run_ids=run_ids)
            tally, not_found = await self._cleanup.delete_runs(run_ids, request.force)
            return pb.DeleteAgentRunsResponse(**tally.counts(), not_found_agent_run_ids=not_found)
        collection_id = check_reference("collection_id", request.collection_id, required=True)
        if not request.HasField("ingested_before"):
            raise InvalidArgument(
                "ingested_before: required with collection_id (a whole collection: "
                "DeleteCollection)"
            )
        collection = await self._storage.get_collection(id=collection_id)
        await self._access.check("collection_id", collection=collection)
        tally = await self._cleanup.delete_runs_before(
            collection, epoch_seconds(request.ingested_before), request.force
        )
        return pb.DeleteAgentRunsResponse(**tally.counts())

    async def CountAgentRuns(
        self, request: pb.CountAgentRunsRequest, context: Context
    ) -> pb.CountAgentRunsResponse:
        collection_id = check_reference("collection_id", request.collection_id, required=True)
        await self._storage.get_collection(id=collection_id)
        await self._access.check("collection_id", collection_id=collection_id)
        return pb.CountAgentRunsResponse(count=await self._storage.count_runs(collection_id))
