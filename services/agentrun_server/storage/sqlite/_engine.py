"""How a storage call reaches a SQLite connection: three paths, one file.

A call is a procedure (`storage._procedures`, a coroutine) over the statements of one connection;
SQLite's never suspend, so whichever thread a path runs on takes the procedure to its end in one
step (`run_to_end`), with no event loop of its own.

- **Writes** run on one storage thread holding one connection, so the process's writes are
  serialized the way SQLite wants them; each batch is one `BEGIN IMMEDIATE` transaction. Several
  processes may share the file (WAL, busy timeout).
- **The hot path**: the Work stream's small settle and claim batches run on the event loop's own
  thread, on a second connection, taking turns with the storage thread through a lock the loop
  never blocks on. Handing a 1-2 ms transaction to a thread costs more than it saves: the two
  threads contend for the GIL at every row SQLite steps (about a quarter of the orchestrator's
  throughput, measured by bench/bench_orchestrate.py).
- **Reads** run on a reader thread with its own read-only connection and no lock: in WAL mode a
  reader never waits for a writer, so a slow read (a scrape, a page of large runs) never holds up
  dispatch.

A checkpointer thread copies the WAL into the database every second (PASSIVE: it never waits for
the writer) and, once the WAL passes `WAL_LIMIT_BYTES`, restarts it: under writes that never pause,
a PASSIVE checkpoint never catches the WAL's end, so the WAL never started over and grew without
bound (6.4 GB beside a 1 GB database).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from agentrun_server._errors import Unavailable
from agentrun_server.storage.sqlite._statements import MAX_SQL_PARAMETERS

_log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
OnConnection = Callable[Concatenate[sqlite3.Connection, P], T]
"""A function of a connection: what each path runs (a procedure, by `run_to_end`)."""

_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}
BUSY_TIMEOUT_SECONDS = 30.0
CHECKPOINT_INTERVAL_SECONDS = 1.0
WAL_CHECK_SECONDS = 0.25
WAL_LIMIT_BYTES = 64 * 1024 * 1024
"""A WAL found larger than this (looked at every WAL_CHECK_SECONDS) is checkpointed and restarted,
briefly holding writers back, and cut back to this size by the next writer."""
WRITER_CACHE_BYTES = 32 * 1024 * 1024
"""The storage thread's page cache (SQLite's default is 2 MB): an upload message's transaction
(up to 17 MB of runs) fits, so SQLite writes each page once at the commit instead of spilling
pages into the WAL mid-transaction and writing them again (uploads of 16 kB runs: 157 -> 117-130
us per run on the storage thread, measured). Filled only as used."""
RESTART_BUSY_TIMEOUT_SECONDS = 0.2
"""How long a restarting checkpoint waits for readers before giving up until the next look."""
HOT_PATH_MAX_TASKS = 256
"""The most tasks (settled plus claimed) a call may touch on the hot path: it blocks the event loop
for its whole transaction, about 10 us per task."""


_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_OUT_OF_RESOURCES = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_IOERR: "a disk I/O error",
    sqlite3.SQLITE_READONLY: "the database file is read-only",
    sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
    sqlite3.SQLITE_NOMEM: "out of memory",
}
"""SQLite's result codes for a database that cannot take a write now but may later: an operator's
problem, not the request's. The client keeps what it sent and retries (UNAVAILABLE)."""


def _primary_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of `exc`; None for errors of the sqlite3 module itself."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # extended codes carry the primary in the low byte


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused because another connection holds the lock."""
    return _primary_code(exc) in _BUSY


def unavailable(exc: sqlite3.Error) -> Unavailable | None:
    """The UNAVAILABLE answer for a storage failure that is not the request's fault (busy past the
    timeout, disk full, I/O error, read-only file), or None for one that is our bug."""
    if is_busy(exc):
        return Unavailable(
            f"storage: {exc} (another process held it over {BUSY_TIMEOUT_SECONDS:.0f} s)"
        )
    why = _OUT_OF_RESOURCES.get(_primary_code(exc) or -1)
    if why is None:
        return None
    _log.error("SQLite cannot write: %s (%s); answering UNAVAILABLE until it can", exc, why)
    return Unavailable(f"storage: {why} ({exc}); nothing was stored, retry", retry_after_seconds=5)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: `BEGIN IMMEDIATE` takes the write lock up front, so the statements
    inside see no other writer's changes between them."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as failed:  # SQLite may have rolled back already (disk full)
                _log.warning("rollback after a failed write failed too: %s", failed)
        raise
    db.execute("COMMIT")


def run_to_end(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a storage procedure to its end on this thread, in one step: nothing a procedure
    awaits on SQLite ever suspends (its statements are plain calls), so no event loop is needed
    and none is blocked but the one whose thread this is, by the hot path's choice.

    Raises:
        RuntimeError: the procedure suspended (it awaited something that waits): our bug.
    """
    try:
        coroutine.send(None)
    except StopIteration as end:
        return end.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a storage procedure suspended on SQLite; its statements must not wait")


def connect(
    path: str, busy_timeout_seconds: float, *, read_only: bool = False, synchronous: str = "normal"
) -> sqlite3.Connection:
    """A connection with the settings every connection of ours shares (`synchronous`: SQLite's
    pragma, "normal" or "full"; see `SqliteConfig`)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
    if not read_only and conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        # A new file gives deleted runs' pages back (`SqliteStorage.reclaim_space`); the mode is
        # fixed by the first table and by WAL's header, so it comes first (an older file:
        # `agentrun migrate --vacuum`).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[synchronous]}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
    # SQLite's default since 3.32; some builds allow more (Debian's: 250,000). Pinned, so a
    # statement that runs here runs on every build (statements here stay far under it).
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_SQL_PARAMETERS)
    if path != ":memory:":
        # A commit that crosses the WAL's auto-checkpoint mark copies the WAL into the file and
        # fsyncs it: ~3-10 ms inside one unlucky request, on whichever connection wrote. No
        # connection of ours does that; the checkpointer does, on a thread of its own.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    if read_only:
        conn.execute("PRAGMA query_only = 1")
    return conn


class Engine:
    """The connections to one SQLite file and the threads that use them.

    `path` ":memory:" keeps everything in one connection (tests only): no hot path, and reads go
    to the storage thread.
    """

    def __init__(self, path: str, synchronous: str = "normal") -> None:
        self.path = path
        self.synchronous = synchronous
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentrun-sqlite")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentrun-sqlite-read")
        self._conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        # The hot path: its loop and connection, once open. The lock makes the loop and the
        # storage thread take turns, so neither ever meets the other's write lock in SQLite.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._unlocked = asyncio.Event()  # set on the loop after each storage thread call
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def in_memory(self) -> bool:
        return self.path == ":memory:"

    async def open(self, migrate: Callable[[sqlite3.Connection], object]) -> None:
        """Connect (creating the file) and run `migrate` on the storage thread's connection."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer, migrate)
        if not self.in_memory:  # a second connection would open a second database
            self._read_conn = await loop.run_in_executor(
                self._reader,
                functools.partial(connect, self.path, BUSY_TIMEOUT_SECONDS, read_only=True),
            )
            self._loop_conn = connect(
                self.path, busy_timeout_seconds=0, synchronous=self.synchronous
            )
            self._loop = loop
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="agentrun-sqlite-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _open_writer(self, migrate: Callable[[sqlite3.Connection], object]) -> None:
        self._conn = connect(self.path, BUSY_TIMEOUT_SECONDS, synchronous=self.synchronous)
        self._conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_BYTES // 1024}")  # in KiB
        migrate(self._conn)

    async def close(self) -> None:
        """Stop checkpointing, close the connections and stop the threads."""
        self._closing.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
        loop = asyncio.get_running_loop()
        if self._read_conn is not None:
            await loop.run_in_executor(self._reader, self._read_conn.close)
        self._reader.shutdown(wait=True)
        # As every storage thread call, this wakes hot calls waiting their turn.
        await self.write(self._close_writer)
        self._writer.shutdown(wait=True)
        if self._loop_conn is not None:
            self._loop = None  # later calls go to the stopped storage thread, and fail
            self._loop_conn.close()
            self._loop_conn = None

    def _close_writer(self, db: sqlite3.Connection) -> None:
        db.close()
        self._conn = None

    async def write(self, fn: OnConnection[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(db, ...)` on the storage thread, taking turns with the hot path.

        Raises:
            Unavailable: another process held the database past the busy timeout, or the disk
                is full, failing or read-only.
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._writer, functools.partial(self._locked, fn, *args, **kwargs)
            )
        except sqlite3.Error as exc:
            answer = unavailable(exc)
            if answer is None:
                raise
            raise answer from exc

    def _locked(self, fn: OnConnection[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        conn = self._conn
        if conn is None:
            raise RuntimeError("storage is not open")
        try:
            with self._lock:
                return fn(conn, *args, **kwargs)
        finally:
            self._wake_hot_path()

    def _wake_hot_path(self) -> None:
        """After a thread let go of the lock: hot calls waiting their turn try again."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._unlocked.set)

    async def hot(self, tasks: int, fn: OnConnection[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Like `write`, but run on the event loop's own thread when the call touches at most
        HOT_PATH_MAX_TASKS tasks.

        The loop never blocks on the storage thread: while that is in a call, the hot call awaits
        its end. Nor on another process: the loop's connection has no busy timeout, so when
        another process holds the write lock the call goes to the storage thread, which waits.
        """
        conn = self._loop_conn
        if (
            conn is not None
            and tasks <= HOT_PATH_MAX_TASKS
            and asyncio.get_running_loop() is self._loop
        ):
            while True:
                self._unlocked.clear()
                if self._lock.acquire(blocking=False):
                    break
                await self._unlocked.wait()
            try:
                return fn(conn, *args, **kwargs)
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    answer = unavailable(exc)
                    if answer is None:
                        raise
                    raise answer from exc
                # Rolled back: wait for the other process on the storage thread.
            finally:
                self._lock.release()
        return await self.write(fn, *args, **kwargs)

    async def read(self, fn: OnConnection[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(db, ...)` on the reader thread's read-only connection (no lock: WAL readers
        never wait for writers)."""
        conn = self._read_conn
        if conn is None:
            return await self.write(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._reader, functools.partial(fn, conn, *args, **kwargs)
            )
        except sqlite3.Error as exc:
            answer = unavailable(exc)
            if answer is None:
                raise
            raise answer from exc

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        wal = self.path + "-wal"
        next_passive = 0.0
        try:
            while not self._closing.wait(WAL_CHECK_SECONDS):
                try:
                    size = os.path.getsize(wal)
                except OSError:
                    size = 0
                try:
                    if size > WAL_LIMIT_BYTES:
                        self._restart(conn, size)
                    elif time.monotonic() >= next_passive:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                        next_passive = time.monotonic() + CHECKPOINT_INTERVAL_SECONDS
                except sqlite3.Error:
                    _log.exception("WAL checkpoint failed; retrying")
        finally:
            conn.close()

    def _restart(self, conn: sqlite3.Connection, size: int) -> None:
        # Two PASSIVE passes copy what they can without holding anyone back (the second, what
        # came in during the first); RESTART then holds writers back while it copies the rest
        # and waits for readers (a short busy timeout bounds that wait), so that the next writer
        # starts the WAL over, cut back to WAL_LIMIT_BYTES (journal_size_limit). Measured: 3 ms
        # of writers held back, where TRUNCATE held them 20-35 ms to shrink the file to nothing.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.execute(f"PRAGMA busy_timeout = {int(RESTART_BUSY_TIMEOUT_SECONDS * 1000)}")
        try:
            # Under the writers' lock: SQLite's busy handler polls for the write lock, and a
            # storage thread committing batch after batch took it back every time, so under a
            # steady upload the WAL never restarted (522 MB beside the 64 MB limit, measured).
            with self._lock:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            self._wake_hot_path()
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        if busy:
            _log.debug("WAL at %d bytes: its restart waited too long for readers; next time", size)
