"""`AgentRunWriter`: non-blocking background uploads, with the API of Docent's AgentRunWriter.

Unlike Docent's writer it never loses a run silently: every run logged ends accepted, duplicate,
rejected (with the server's reason) or undelivered, and `finish()` returns those counts. Runs are
encoded when logged (later edits do not leak into the upload, and a bad run raises in the caller).
It installs no signal handlers and never hangs interpreter exit: its threads are daemons, and a
forgotten `finish()` runs at exit, bounded by `shutdown_timeout`.
"""

from __future__ import annotations

import atexit
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from agentrun import _metrics
from agentrun._agent_run import AgentRun
from agentrun._client import Client, open_channel
from agentrun._convert import agent_run_to_proto
from agentrun._errors import WriterClosedError
from agentrun.v1 import ingestion_service_pb2 as pb

_log = logging.getLogger(__name__)

UPLOAD_METHOD = "/agentrun.v1.IngestionService/UploadAgentRuns"
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
UPLOAD_TIMEOUT_SECONDS = 120.0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_upload_request(collection_id: bytes, runs: Iterable[bytes]) -> bytes:
    """Encode an `UploadAgentRunsRequest` from already-encoded runs, without decoding them.

    Field 1 (collection_id) and repeated field 2 (agent_runs) are length-delimited; a message is
    the concatenation of its fields.
    """
    parts = [b"\x0a", _varint(len(collection_id)), collection_id]
    for run in runs:
        parts += (b"\x12", _varint(len(run)), run)
    return b"".join(parts)


@dataclass(frozen=True)
class RejectedRun:
    """A run the server refused, with its reason (e.g. "INVALID") and explanation."""

    agent_run_id: str
    reason: str
    message: str


@dataclass
class WriteSummary:
    """What became of every run logged to a writer."""

    accepted: int = 0
    """Runs stored by this writer."""
    duplicates: int = 0
    """Runs whose id the server had stored already (nothing stored twice)."""
    rejected: list[RejectedRun] = field(default_factory=list)
    """Runs the server refused, with reasons."""
    undelivered: int = 0
    """Runs never acknowledged: the server was unreachable, or finish() timed out or was forced."""
    errors: list[str] = field(default_factory=list)
    """Why batches went undelivered."""

    @property
    def ok(self) -> bool:
        """True when every run was stored or found stored."""
        return not self.rejected and not self.undelivered


@dataclass
class _Item:
    run_id: str
    data: bytes


class AgentRunWriter:
    """Uploads runs in the background, as Docent's `AgentRunWriter` does, over gRPC.

    Args:
        collection_id: The collection to write to.
        server_url: The ingestion server (`host:port`); None uses $AGENTRUN_SERVER or
            127.0.0.1:50051.
        num_workers: Concurrent upload streams.
        queue_maxsize: Runs queued at most; `log_agent_runs` blocks while full. <= 0: unbounded.
        flush_interval: Seconds a partial batch waits for more runs before it is sent.
        batch_size: Most runs per batch.
        shutdown_timeout: Seconds `finish()` waits for queued and in-flight runs.
        max_batch_bytes: Most encoded bytes per batch (under the server's max message size).
        on_rejected: Called (from a writer thread) with each run the server rejects.
    """

    def __init__(
        self,
        collection_id: str,
        server_url: str | None = None,
        *,
        num_workers: int = 2,
        queue_maxsize: int = 20_000,
        flush_interval: float = 1.0,
        batch_size: int = 1_000,
        shutdown_timeout: float = 60,
        max_batch_bytes: int = 8 * 1024 * 1024,
        on_rejected: Callable[[RejectedRun], None] | None = None,
    ) -> None:
        if num_workers < 1 or batch_size < 1 or max_batch_bytes < 1:
            raise ValueError("num_workers, batch_size and max_batch_bytes must be at least 1")
        self.collection_id = collection_id
        self.server_url = server_url
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.shutdown_timeout = shutdown_timeout
        self.max_batch_bytes = max_batch_bytes
        self._on_rejected = on_rejected
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=max(0, queue_maxsize))
        self._summary = WriteSummary()
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._pending = 0  # logged, not yet accepted/duplicate/rejected/undelivered
        self._stop = threading.Event()
        self._closed = False
        self._channel = open_channel(server_url)
        self._upload = self._channel.stream_unary(
            UPLOAD_METHOD,
            request_serializer=None,  # requests are pre-encoded bytes
            response_deserializer=pb.UploadAgentRunsResponse.FromString,
        )
        self._workers = [
            threading.Thread(target=self._work, name=f"agentrun-writer-{i}", daemon=True)
            for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()
        atexit.register(self._finish_at_exit)

    # --- producer side --------------------------------------------------------------------------

    def log_agent_runs(self, agent_runs: Iterable[AgentRun]) -> None:
        """Queue runs for upload; blocks only while the queue is full.

        Raises:
            WriterClosedError: `finish()` was called.
            TypeError: a run's metadata is not JSON-like (raised here, in the caller).
        """
        items = [_Item(run.id, agent_run_to_proto(run).SerializeToString()) for run in agent_runs]
        with self._lock:
            if self._closed:
                raise WriterClosedError("log_agent_runs() after finish()")
            self._pending += len(items)
        for item in items:
            self._queue.put(item)
            _metrics.WRITER_QUEUED_RUNS.inc()

    # --- shutdown -------------------------------------------------------------------------------

    def finish(self, force: bool = False) -> WriteSummary:
        """Stop accepting runs, wait for queued and in-flight ones, and report what became of all.

        Waits up to `shutdown_timeout` seconds (not at all with `force=True`); runs still queued
        or in flight then are cancelled and counted as undelivered. Idempotent.
        """
        with self._lock:
            self._closed = True
            if not force:
                deadline = time.monotonic() + self.shutdown_timeout
                while self._pending and time.monotonic() < deadline:
                    self._settled.wait(deadline - time.monotonic())
        self._stop.set()
        if force or self._pending:
            self._channel.close()  # cancels in-flight uploads
        for worker in self._workers:
            worker.join(timeout=5.0)
        abandoned = 0
        while True:
            try:
                self._queue.get_nowait()
                _metrics.WRITER_QUEUED_RUNS.dec()
                abandoned += 1
            except queue.Empty:
                break
        with self._lock:
            self._settle_undelivered(abandoned, "finish() before upload")
            self._pending = 0
            summary = self._summary
        self._channel.close()
        atexit.unregister(self._finish_at_exit)
        if not summary.ok:
            _log.warning(
                "agentrun writer finished with %d rejected and %d undelivered runs",
                len(summary.rejected),
                summary.undelivered,
            )
        return summary

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
            batch = self._gather()
            if batch:
                self._send(batch)

    def _gather(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        deadline = None
        while len(batch) < self.batch_size and not self._stop.is_set():
            timeout = 0.1 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                if deadline is not None or self._closed:
                    break
                continue
            _metrics.WRITER_QUEUED_RUNS.dec()
            batch.append(item)
            size += len(item.data)
            if deadline is None:
                deadline = time.monotonic() + (0 if self._closed else self.flush_interval)
            if size >= self.max_batch_bytes:
                break
        return batch

    def _requests(self, batch: list[_Item]) -> Iterator[bytes]:
        collection = self.collection_id.encode()
        message: list[bytes] = []
        size = 0
        for item in batch:
            if message and size + len(item.data) > self.max_batch_bytes:
                yield encode_upload_request(collection, message)
                message, size = [], 0
            message.append(item.data)
            size += len(item.data)
        if message:
            yield encode_upload_request(collection, message)

    def _send(self, batch: list[_Item]) -> None:
        attempt = 0
        while True:
            _metrics.WRITER_SENT_BYTES.inc(sum(len(item.data) for item in batch))
            try:
                response = self._upload(
                    self._requests(batch), timeout=UPLOAD_TIMEOUT_SECONDS, wait_for_ready=True
                )
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                if code in RETRYABLE_CODES and not self._stop.is_set():
                    attempt += 1
                    delay = min(MAX_BACKOFF_SECONDS, INITIAL_BACKOFF_SECONDS * 2 ** (attempt - 1))
                    delay *= random.uniform(0.8, 1.2)
                    _log.info(
                        "upload of %d runs failed (%s); retry in %.1f s",
                        len(batch),
                        code.name,
                        delay,
                    )
                    if not self._stop.wait(delay):
                        _metrics.WRITER_RETRIES.inc()
                        continue
                with self._lock:
                    self._settle_undelivered(len(batch), f"{code.name}: {details}")
                _log.error(
                    "upload of %d runs failed for good: %s: %s", len(batch), code.name, details
                )
                return
            self._record(batch, response)
            return

    def _record(self, batch: list[_Item], response: pb.UploadAgentRunsResponse) -> None:
        rejected = [
            RejectedRun(
                batch[r.index].run_id if r.index < len(batch) else r.agent_run_id,
                pb.RejectionReason.Name(r.reason).removeprefix("REJECTION_REASON_"),
                r.message,
            )
            for r in response.rejected
        ]
        with self._lock:
            s = self._summary
            s.accepted += response.accepted_count
            s.duplicates += response.duplicate_count
            s.rejected += rejected
            self._pending -= len(batch)
            _metrics.WRITER_RUNS.labels("accepted").inc(response.accepted_count)
            _metrics.WRITER_RUNS.labels("duplicate").inc(response.duplicate_count)
            _metrics.WRITER_RUNS.labels("rejected").inc(len(rejected))
            self._settled.notify_all()
        for run in rejected:
            _log.warning("run %s rejected: %s", run.agent_run_id, run.message)
            if self._on_rejected is not None:
                self._on_rejected(run)

    def _settle_undelivered(self, count: int, why: str) -> None:
        if not count:
            return
        self._summary.undelivered += count
        _metrics.WRITER_RUNS.labels("undelivered").inc(count)
        _metrics.WRITER_DROPPED_RUNS.inc(count)
        self._summary.errors.append(why)
        self._pending -= count
        self._settled.notify_all()


def init(
    collection_name: str = "Agent Run Collection",
    collection_id: str | None = None,
    server_url: str | None = None,
    workflow: str | None = None,
    **writer_options: object,
) -> AgentRunWriter:
    """Return a writer for a collection, as `docent.init` does.

    With no `collection_id`, the collection named `collection_name` is created (or reused: names
    are unique), bound to `workflow` if given, so each run written enters its first stage.
    `writer_options` go to `AgentRunWriter` (num_workers, batch_size, ...).

    Raises:
        RpcError: the server is unreachable, the collection or workflow does not exist, or the
            collection is bound to another workflow.
    """
    with Client(server_url) as client:
        if collection_id is None:
            collection_id = client.create_collection(
                collection_name, workflow=workflow or ""
            ).collection.id
        else:
            client.get_collection(collection_id)
    return AgentRunWriter(collection_id, server_url, **writer_options)  # type: ignore[arg-type]
