"""Live run events on local disk (a writer's `spool_dir`) from `LiveRun.append` until acknowledged.

Events are acknowledged in the order they were made (one stream per writer, answered in order), so
the journal is a log with a settled prefix: each event is appended to the current log file as it is
made, and a file is deleted once every event in it is acknowledged. A writer started on the spool
sends the events of the files left behind before any new one, in their order; the server answers
those it stored already as duplicates (each carries its run id and sequence number).

Log format: the magic line, then the encoded `AgentRunEvent`s, each length-delimited (a protobuf
varint length, then the bytes). An event is written with one `write` to an unbuffered file, so once
`append` returns it survives the death of the process; with `fsync`, a power loss too.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agentrun import _metrics
from agentrun._errors import SpoolError
from agentrun._files import fsync_directory, set_aside
from agentrun.wire.framing import encode_varint, split_records

_log = logging.getLogger(__name__)

MAGIC = b"agentrun-events-1\n"
PATTERN = "events-*.log"
ROLL_BYTES = 8 * 1024 * 1024
"""A log file takes events up to about this size; the next event starts a new file."""


def parse_log(data: bytes) -> tuple[list[bytes], str | None]:
    """(the whole events, what is wrong past them or None) of a log file's bytes."""
    if not data.startswith(MAGIC):
        return [], "not an event log"
    events, torn = split_records(data, len(MAGIC))
    return events, f"torn after {len(events)} events" if torn else None


@dataclass
class _File:
    path: Path
    events: int = 0
    settled: int = 0
    size: int = 0


class EventJournal:
    """The event logs in a spool directory; its owner (`Spool`) holds the directory's lock.

    Not thread-safe: the writer's event sender calls it under its own lock, which also orders the
    events it queues, so the journal's order is the order events are sent and acknowledged in.
    """

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        self._files: collections.deque[_File] = collections.deque()  # oldest first
        self._current: BinaryIO | None = None
        existing = sorted(directory.glob(PATTERN))
        self._next = int(existing[-1].stem.removeprefix("events-")) + 1 if existing else 0
        self.damage: list[str] = []
        """One line per damaged log file found by `replay`."""

    @property
    def unsettled(self) -> int:
        """Events on disk not yet acknowledged."""
        return sum(f.events - f.settled for f in self._files)

    def replay(self) -> list[bytes]:
        """The events of the logs left on disk, oldest first; they count as the first unsettled.

        A damaged file (torn by a power loss, or not a log) is kept as `*.bad`; its whole events
        before the damage are rewritten under its name, so they keep their place in the order.
        """
        events: list[bytes] = []
        for path in sorted(self.directory.glob(PATTERN)):
            try:
                data = path.read_bytes()
            except OSError as exc:
                self._set_aside(path, exc.strerror or str(exc), [])
                continue
            found, problem = parse_log(data)
            if problem is not None:
                self._set_aside(path, problem, found)
            if not found:
                path.unlink(missing_ok=True)
                continue
            self._files.append(_File(path, len(found), 0, len(data)))
            events += found
            _metrics.WRITER_SPOOL_EVENTS.inc(len(found))
        return events

    def _set_aside(self, path: Path, problem: str, salvaged: list[bytes]) -> None:
        bad = set_aside(path)
        if salvaged and bad != path:
            try:
                self._write_whole(path, salvaged)
            except OSError:
                bad = path
        line = (
            f"spool event log {path.name} is damaged ({problem}): {len(salvaged)} whole events "
            f"before the damage are being delivered; the file is kept as {bad}"
        )
        _log.error("%s", line)
        self.damage.append(line)

    def _write_whole(self, path: Path, events: list[bytes]) -> None:
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as f:
            f.write(MAGIC + b"".join(encode_varint(len(e)) + e for e in events))
            if self.fsync:
                os.fsync(f.fileno())
        os.rename(temporary, path)

    def append(self, event: bytes) -> None:
        """Write one encoded event, durably (for its `fsync` setting) before returning.

        Raises:
            SpoolError: the disk refused the write (full, read-only); the event is not spooled.
        """
        record = encode_varint(len(event)) + event
        try:
            current = self._open()
            current.write(record)
            if self.fsync:
                os.fsync(current.fileno())
        except OSError as exc:
            raise SpoolError(f"spool_dir {str(self.directory)!r}: {exc.strerror}") from exc
        last = self._files[-1]
        last.events += 1
        last.size += len(record)
        _metrics.WRITER_SPOOL_EVENTS.inc()

    def _open(self) -> BinaryIO:
        if self._current is not None and self._files[-1].size < ROLL_BYTES:
            return self._current
        self._close_current()
        path = self.directory / f"events-{self._next:020d}.log"
        self._next += 1
        current: BinaryIO = open(path, "xb", buffering=0)  # noqa: SIM115 (held open)
        try:
            current.write(MAGIC)
            if self.fsync:
                os.fsync(current.fileno())
                fsync_directory(self.directory)
        except OSError:
            current.close()
            path.unlink(missing_ok=True)
            raise
        self._current = current
        self._files.append(_File(path, 0, 0, len(MAGIC)))
        return current

    def settle(self, count: int) -> None:
        """Count the oldest `count` unsettled events as acknowledged; delete the files they fill."""
        _metrics.WRITER_SPOOL_EVENTS.dec(count)
        while count and self._files:
            oldest = self._files[0]
            taken = min(count, oldest.events - oldest.settled)
            oldest.settled += taken
            count -= taken
            if oldest.settled < oldest.events:
                break
            if len(self._files) == 1 and self._current is not None:
                if oldest.size < ROLL_BYTES:
                    break  # the file being written stays open until it is full
                self._close_current()
            self._files.popleft().path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the current file; delete it if every event in it is acknowledged."""
        self._close_current()
        while self._files and self._files[0].settled >= self._files[0].events:
            self._files.popleft().path.unlink(missing_ok=True)

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
