"""The writer's durable spool: runs on local disk from `log_agent_runs` until the server acks them
(and live run events, in the same directory: `agentrun._event_spool`).

A spool is a directory of segment files, one per slice of a `log_agent_runs` call (at most
`batch_size` runs). A segment is written to a temporary name and renamed into place, so a reader
only ever sees whole segments; it is deleted once every run in it is settled (stored, found stored,
or rejected). A writer started on a spool replays the segments left behind; resending is safe
because run ids are idempotency keys. One writer at a time holds a spool (an exclusive `flock`).

Segment format: the magic line, the collection id, then the encoded runs, each length-delimited
(a protobuf varint length, then the bytes).

Without `fsync`, a segment survives the death of the process (SIGKILL, a crash): the kernel holds
its pages. With `fsync`, it also survives the machine losing power, at the price of a disk flush per
segment.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from agentrun import _metrics
from agentrun._errors import SpoolError
from agentrun._event_spool import EventJournal
from agentrun._files import fsync_directory, set_aside
from agentrun.wire.framing import encode_varint, read_varint, split_records

_log = logging.getLogger(__name__)

MAGIC = b"agentrun-spool-1\n"
SUFFIX = ".seg"


def parse_segment(data: bytes) -> tuple[bytes, list[bytes], str | None]:
    """(collection id, the whole runs, what is wrong past them or None) of a segment's bytes.

    A segment torn by a crash or power loss (rename reached the disk, not all of the data) still
    gives up every run before the tear.
    """
    if not data.startswith(MAGIC):
        return b"", [], "not a spool segment"
    try:
        length, pos = read_varint(data, len(MAGIC))
    except ValueError:
        return b"", [], "torn in its header"
    if pos + length > len(data):
        return b"", [], "torn in its header"
    collection = data[pos : pos + length]
    runs, torn = split_records(data, pos + length)
    return collection, runs, f"torn after {len(runs)} runs" if torn else None


class Segment:
    """One spool file: its runs still unsettled, counted down as the server acks them."""

    def __init__(self, path: Path, runs: int, size: int) -> None:
        self.path = path
        self.remaining = runs
        self.size = size


class Spool:
    """A spool directory held by one writer.

    Raises:
        SpoolError: the directory cannot be created, or another writer holds it.
    """

    def __init__(self, directory: str | os.PathLike[str], fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._lock = threading.Lock()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.directory / ".lock", "a+b")  # noqa: SIM115 (held open)
        except OSError as exc:
            raise SpoolError(f"spool_dir {str(self.directory)!r}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolError(
                f"spool_dir {str(self.directory)!r} is held by another writer; "
                "each writer needs its own spool"
            ) from None
        for stale in self.directory.glob("*.tmp"):  # a write cut off before its rename
            stale.unlink(missing_ok=True)
        existing = sorted(self.directory.glob("*" + SUFFIX))
        self._next = int(existing[-1].stem) + 1 if existing else 0
        self.runs = 0
        self.bytes = 0
        self.damage: list[str] = []
        """One line per damaged segment found by `replay`."""
        self.events = EventJournal(self.directory, fsync)
        """Live run events (see `agentrun._event_spool`)."""

    def replay(self) -> Iterator[tuple[Segment, bytes, list[bytes]]]:
        """Yield (segment, collection id, encoded runs) for each segment left on disk, oldest first.

        A damaged segment (torn by a crash or power loss, or not a segment) is renamed to `*.bad`
        and kept for inspection; the whole runs before the damage are salvaged into a new segment
        and yielded. Each damaged segment adds a line to `damage`.
        """
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            try:
                data = path.read_bytes()
            except OSError as exc:
                self._set_aside(path, exc.strerror or str(exc), 0)
                continue
            collection, runs, problem = parse_segment(data)
            if problem is not None:
                self._set_aside(path, problem, len(runs))
                if runs:
                    yield self.append(collection, runs), collection, runs
                continue
            if not runs:
                path.unlink(missing_ok=True)
                continue
            segment = Segment(path, len(runs), sum(len(r) for r in runs))
            self._count(len(runs), segment.size)
            yield segment, collection, runs

    def _set_aside(self, path: Path, problem: str, salvaged: int) -> None:
        bad = set_aside(path)
        line = (
            f"spool segment {path.name} is damaged ({problem}): {salvaged} whole runs before "
            f"the damage are being delivered; the file is kept as {bad}"
        )
        _log.error("%s", line)
        self.damage.append(line)

    def append(self, collection: bytes, runs: list[bytes]) -> Segment:
        """Write runs as one new segment, durably before returning.

        Raises:
            SpoolError: the disk refused the write (full, read-only); nothing was spooled.
        """
        parts = [MAGIC, encode_varint(len(collection)), collection]
        for run in runs:
            parts += (encode_varint(len(run)), run)
        with self._lock:
            name = f"{self._next:020d}"
            self._next += 1
        path = self.directory / (name + SUFFIX)
        temporary = self.directory / (name + ".tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(b"".join(parts))
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(temporary, path)
            if self.fsync:
                fsync_directory(self.directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise SpoolError(f"spool_dir {str(self.directory)!r}: {exc.strerror}") from exc
        segment = Segment(path, len(runs), sum(len(r) for r in runs))
        self._count(len(runs), segment.size)
        return segment

    def settle(self, segment: Segment, runs: int) -> None:
        """Count runs of a segment as settled; the last one deletes the file."""
        with self._lock:
            segment.remaining -= runs
            done = segment.remaining <= 0
        if done:
            segment.path.unlink(missing_ok=True)
        # A partly settled segment keeps all its bytes on disk.
        self._count(-runs, -segment.size if done else 0)

    def close(self) -> None:
        """Release the spool to the next writer (segments and unacknowledged events stay for it)."""
        self.events.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def _count(self, runs: int, size: int) -> None:
        with self._lock:
            self.runs += runs
            self.bytes += size
        _metrics.WRITER_SPOOL_RUNS.inc(runs)
        _metrics.WRITER_SPOOL_BYTES.inc(size)
