"""Domain records that cross the storage interface. Runs, outputs and inputs are opaque bytes here
(encoded protobuf messages): storage never imports generated code."""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from agentrun.wire.limits import (
    MAX_ATTEMPTS,
    MAX_DELAY_SECONDS,
    MAX_LEASE_SECONDS,
    MAX_PATHWAYS,
    MAX_STAGES,
)
from agentrun_server._checks import check_identifier
from agentrun_server._errors import InvalidArgument, NotFound, ServerError

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_INITIAL_BACKOFF_SECONDS = 1.0
DEFAULT_MAX_BACKOFF_SECONDS = 60.0
DEFAULT_LEASE_SECONDS = 300.0


@dataclass(frozen=True)
class PoolConfig:
    """A database server's connection pool and statement limit (PostgreSQL; SQLite has none)."""

    max_connections: int = 10
    """Connections the pool opens at most (a Work stream's settle takes one briefly)."""
    statement_timeout_seconds: float = 30.0
    """A statement running longer is cancelled; its call is answered UNAVAILABLE."""


SQLITE_SYNCHRONOUS = ("normal", "full")


@dataclass(frozen=True)
class SqliteConfig:
    """How SQLite trades durability for speed (SQLite's `PRAGMA synchronous`, in WAL mode)."""

    synchronous: str = field(default="normal", metadata={"choices": SQLITE_SYNCHRONOUS})
    """"normal": a commit survives the server's crash or kill, and the database is never
    corrupted, but the last commits before a power loss or OS crash may be lost (SQLite syncs
    the WAL at checkpoints, not at each commit). "full": every commit is synced to the disk
    before it is acknowledged, so it survives power loss too, at the price of an fsync per
    write transaction."""

    def __post_init__(self) -> None:
        if self.synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(
                f"synchronous: choose {' or '.join(SQLITE_SYNCHRONOUS)}, not {self.synchronous!r}"
            )


@dataclass(frozen=True, slots=True)
class Collection:
    """A named set of runs, optionally bound to a workflow (empty string: unbound)."""

    id: str
    name: str
    description: str
    workflow: str
    created_at: float
    run_count: int = 0
    enter_on_abandon: bool = False
    """Its live runs enter the workflow when abandoned, not only when they finish."""
    retention_days: int = 0
    """Days a run is kept after it is stored; 0: until deleted."""


class RunSize(NamedTuple):
    """A run's collection and the bytes it takes (a live run: its events' patches)."""

    collection_id: str
    size_bytes: int


class Facet(NamedTuple):
    """A run's score (`scores.NAME`) or top-level scalar metadata field (`metadata.FIELD`), as
    the filters of a listing see it: a number (a bool as 0 or 1) or a string."""

    key: str
    num: float | None
    text: str | None


class RunFilter(NamedTuple):
    """One condition of a listing: `key` (as in `Facet`) `op` (=, !=, <, <=, >, >=) a number
    or a string (= and != only)."""

    key: str
    op: str
    num: float | None
    text: str | None


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Which runs of a collection a listing returns, and in which order."""

    collection_id: str
    state: str | None = None
    """"running", "finished", "abandoned" or None (all)."""
    abandoned_before: float = 0.0
    """A running run with no event since is abandoned."""
    filters: tuple[RunFilter, ...] = ()
    newest_first: bool = False


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to insert: its id, name, and its encoded `agentrun.v1.AgentRun` (as received), with
    its facets (for filtered listings)."""

    id: str
    name: str | None
    data: bytes | memoryview
    facets: tuple[Facet, ...] = ()


class InsertStatus(enum.Enum):
    """What happened to one inserted run."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class InsertOutcome:
    """The outcome of one inserted run; for CONFLICT, the collection already holding the id."""

    status: InsertStatus
    existing_collection_id: str | None = None


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A stored run with its encoded data; a live run that has not finished has its events'
    patches in `parts` instead (`data` empty), for the caller to fold."""

    id: str
    collection_id: str
    ingested_at: float
    data: bytes
    seq: int
    state: str = "finished"
    """"running", "finished" or "abandoned"."""
    updated_at: float | None = None
    """When its last event was stored; None for a whole-run upload."""
    next_sequence: int = 0
    """The sequence number its next event takes; 0 for a whole-run upload."""
    parts: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event of a live run: an encoded partial AgentRun, in the run's sequence."""

    run_id: str
    sequence: int
    collection_id: str
    patch: bytes
    finish: bool = False
    digest: bytes = b""
    """`event_digest(patch, finish)`: what tells a resend of this event from another event
    under its sequence number."""


class EventStatus(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """What became of an event; `error` says why it was refused; `next_sequence` is where the run
    resumes (0: no such run)."""

    status: EventStatus
    next_sequence: int
    error: ServerError | None = None


class Folded(NamedTuple):
    """A live run made whole: encoded, its name, its facets."""

    data: bytes
    name: str | None
    facets: tuple[Facet, ...] = ()


Fold = Callable[[str, Sequence[bytes]], Folded]
"""(run id, the patches of its events in order) -> the run made whole. Raises InvalidArgument
when the patches do not make a run that can be stored (no transcript)."""


@dataclass(frozen=True, slots=True)
class StageDef:
    """One stage: pathway name -> next stage (None ends the workflow), and its task policy."""

    name: str
    pathways: dict[str, str | None] = field(default_factory=dict)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff_seconds: float = DEFAULT_INITIAL_BACKOFF_SECONDS
    max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_SECONDS
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    def next_stage(self, pathway: str) -> str | None:
        """The stage `pathway` leads to (None: the end).

        Raises:
            InvalidArgument: the stage has no such pathway; the message lists the valid ones.
        """
        if not self.pathways and pathway == "":
            return None
        if pathway not in self.pathways:
            valid = ", ".join(repr(p) for p in self.pathways) or "none: complete with an empty one"
            raise InvalidArgument(
                f"pathway {pathway!r} is not a pathway of stage {self.name!r}; valid pathways: "
                f"{valid}"
            )
        return self.pathways[pathway]


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """A workflow: stages in order (the first is where runs enter)."""

    name: str
    stages: tuple[StageDef, ...]
    version: int = 0
    updated_at: float = 0.0

    @property
    def first_stage(self) -> StageDef:
        """The stage runs enter."""
        return self.stages[0]

    def stage(self, name: str) -> StageDef:
        """The stage called `name`.

        Raises:
            NotFound: no such stage; the message lists the valid ones.
        """
        for stage in self.stages:
            if stage.name == name:
                return stage
        valid = ", ".join(repr(s.name) for s in self.stages)
        raise NotFound(f"workflow {self.name!r} has no stage {name!r}; stages: {valid}")

    def validate(self) -> None:
        """Check names, uniqueness, policies, and that every pathway leads somewhere.

        Raises:
            InvalidArgument: naming the stage or pathway at fault, and the limit it breaks
                (`agentrun.wire.limits`).
        """
        check_identifier("workflow.name", self.name)
        if not self.stages:
            raise InvalidArgument(f"workflow {self.name!r}: stages: at least one stage is required")
        if len(self.stages) > MAX_STAGES:
            raise InvalidArgument(
                f"workflow {self.name!r}: stages: {len(self.stages):,} stages, over the limit of "
                f"{MAX_STAGES}"
            )
        names: set[str] = set()
        for i, stage in enumerate(self.stages):  # names first: messages below list them
            where = f"workflow {self.name!r}: stages[{i}]"
            check_identifier(f"{where}.name", stage.name)
            if stage.name in names:
                raise InvalidArgument(f"{where}.name: stage {stage.name!r} is defined twice")
            names.add(stage.name)
        for i, stage in enumerate(self.stages):
            where = f"workflow {self.name!r}: stages[{i}]"
            if not 1 <= stage.max_attempts <= MAX_ATTEMPTS:
                raise InvalidArgument(
                    f"{where}.retry_policy.max_attempts: {stage.max_attempts}; must be 1 to "
                    f"{MAX_ATTEMPTS}"
                )
            if not 0 < stage.lease_seconds <= MAX_LEASE_SECONDS:
                raise InvalidArgument(
                    f"{where}.lease_duration: {stage.lease_seconds:g} s; must be more than 0 s "
                    f"and at most {MAX_LEASE_SECONDS:g} s"
                )
            for what, seconds in (
                ("initial_backoff", stage.initial_backoff_seconds),
                ("max_backoff", stage.max_backoff_seconds),
            ):
                if not 0 <= seconds <= MAX_DELAY_SECONDS:
                    raise InvalidArgument(
                        f"{where}.retry_policy.{what}: {seconds:g} s; must be 0 s to "
                        f"{MAX_DELAY_SECONDS:g} s"
                    )
            if len(stage.pathways) > MAX_PATHWAYS:
                raise InvalidArgument(
                    f"{where}.pathways: {len(stage.pathways)} pathways, over the limit of "
                    f"{MAX_PATHWAYS}"
                )
            for pathway, target in stage.pathways.items():
                check_identifier(f"{where}.pathways name", pathway)
                if target is not None and target not in names:
                    raise InvalidArgument(
                        f"{where}.pathways[{pathway!r}]: leads to unknown stage {target[:128]!r}; "
                        f"stages: {', '.join(repr(s.name) for s in self.stages[:20])}"
                    )

    def to_json(self) -> str:
        """The definition (without version) as JSON, for storage."""
        return json.dumps(
            [
                {
                    "name": s.name,
                    "pathways": [[p, t] for p, t in s.pathways.items()],
                    "max_attempts": s.max_attempts,
                    "initial_backoff_seconds": s.initial_backoff_seconds,
                    "max_backoff_seconds": s.max_backoff_seconds,
                    "lease_seconds": s.lease_seconds,
                }
                for s in self.stages
            ]
        )

    @classmethod
    def from_json(cls, name: str, text: str, version: int, updated_at: float) -> WorkflowDef:
        """Rebuild a stored definition."""
        stages: list[dict[str, Any]] = json.loads(text)
        return cls(
            name=name,
            stages=tuple(
                StageDef(
                    name=s["name"],
                    pathways={p: t for p, t in s["pathways"]},
                    max_attempts=s["max_attempts"],
                    initial_backoff_seconds=s["initial_backoff_seconds"],
                    max_backoff_seconds=s["max_backoff_seconds"],
                    lease_seconds=s["lease_seconds"],
                )
                for s in stages
            ),
            version=version,
            updated_at=updated_at,
        )


class TaskState(enum.Enum):
    """The state of a task, as stored."""

    READY = "ready"
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"
    CANCELLED = "cancelled"


# The records built per task on the Work stream's hot path are NamedTuples: as immutable as a
# frozen dataclass, and 4x cheaper to build (a frozen dataclass sets each field through
# object.__setattr__).


class LeasedTask(NamedTuple):
    """A task just leased, with the encoded run it works on."""

    task_id: int
    lease_id: str
    attempt: int
    max_attempts: int
    deadline: float
    stage: str
    agent_run_id: str
    collection_id: str
    priority: int
    input: bytes | None
    created_at: float
    run_data: bytes


class Completion(NamedTuple):
    """Complete a leased task with a pathway and an optional encoded output."""

    task_id: int
    lease_id: str
    pathway: str
    output: bytes | None = None


class LeaseHolder(NamedTuple):
    """Who holds (or held) a lease: the Work stream's worker identity (`Subscribe.worker`), the
    name of its API key ("" when the server checks none), and its session id."""

    worker: str
    key: str
    session_id: str

    def encode(self) -> str:
        """The stored form: a JSON array."""
        return json.dumps(list(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | None) -> LeaseHolder | None:
        """The stored form read back; None for a lease stored before holders were kept."""
        return None if not text else cls(*json.loads(text))


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """What one Work session may lease now."""

    session_id: str
    workflow: str
    stage_limits: dict[str, int]
    """Stage -> most tasks of it to lease now (a stage at 0 is skipped)."""
    limit: int
    """Most tasks in all: the session's free credits."""
    lease_seconds: float | None
    """Lease duration; None uses each stage's."""
    max_bytes: int | None = None
    """Most encoded bytes (runs and stage inputs) in all; the first task goes regardless, so a
    run larger than this still goes alone. None: no bound."""
    server_id: str = ""
    """The server process serving the session (its heartbeat vouches for the leases)."""
    worker: str = ""
    """The session's worker identity (`Subscribe.worker`)."""
    key: str = ""
    """The name of the session's API key."""

    @property
    def holder(self) -> LeaseHolder:
        """Who the leases granted are held by."""
        return LeaseHolder(self.worker, self.key, self.session_id)


class Failure(NamedTuple):
    """Report a failed attempt."""

    task_id: int
    lease_id: str
    error: str
    non_retryable: bool = False
    retry_after_seconds: float | None = None


class Extension(NamedTuple):
    """Extend a lease to now + `lease_seconds` (None: the stage's lease duration)."""

    task_id: int
    lease_id: str
    lease_seconds: float | None = None


class Release(NamedTuple):
    """Hand back a leased task without costing an attempt: ready again at once, or after
    `delay_seconds` (a worker's "not now", which is not an error)."""

    task_id: int
    lease_id: str
    delay_seconds: float = 0.0


class LeaseRef(NamedTuple):
    """A lease a worker still holds, presented again on a new stream (`Subscribe.resume`)."""

    task_id: int
    lease_id: str


class Revocation(NamedTuple):
    """A lease taken back from the live stream holding it, for that stream's worker to hear."""

    task_id: int
    lease_id: str
    session_id: str
    reason: str
    """"cancelled" or "expired"."""


class EndedLease(NamedTuple):
    """A lease the server ended (expired, cancelled, or its stream closed)."""

    task_id: int
    lease_id: str
    session_id: str | None
    """The Work session that held it (None once that closed)."""
    workflow: str
    stage: str
    dead: bool
    """The attempt was the task's last: it is dead; else it is ready again (or cancelled)."""


class AckCode(enum.IntEnum):
    """Outcome of one settle item, with the canonical gRPC status numbers."""

    OK = 0
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    FAILED_PRECONDITION = 9


class AckResult(enum.StrEnum):
    """What a settle item did (a metric label): the task's move, or that nothing moved."""

    DONE = "done"
    RETRY = "retry"
    """Failed; ready again after a backoff."""
    DEAD = "dead"
    """Failed for the last time, or non-retryable: a dead letter."""
    EXTENDED = "extended"
    RELEASED = "released"
    RESUMED = "resumed"
    REPEAT = "repeat"
    """A settle repeated under the same lease: answered as the first time, nothing moved."""
    REFUSED = ""
    """Nothing moved: the Ack's code says why."""


class Ack(NamedTuple):
    """The outcome of one complete, fail, extend, release or resume item."""

    task_id: int
    lease_id: str
    code: AckCode = AckCode.OK
    message: str = ""
    deadline: float | None = None
    next_task_id: int | None = None
    stage: str = ""
    """The task's stage (for the metrics; "" for a task that does not exist)."""
    result: AckResult = AckResult.REFUSED


@dataclass(frozen=True, slots=True)
class AttemptFailureRecord:
    """One failed attempt in a task's history."""

    attempt: int
    error: str
    failed_at: float
    holder: LeaseHolder | None = None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as stored."""

    id: int
    workflow: str
    stage: str
    agent_run_id: str
    collection_id: str
    state: TaskState
    attempt: int
    max_attempts: int
    priority: int
    created_at: float
    ready_at: float
    lease_deadline: float | None
    pathway: str | None
    output: bytes | None
    input: bytes | None
    previous_task_id: int | None
    holder: LeaseHolder | None = None
    """The lease's holder while leased; the completing attempt's once done."""
    failures: tuple[AttemptFailureRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class StageBacklog:
    """Task counts of one stage, and the age of its oldest ready task."""

    workflow: str
    stage: str
    ready: int = 0
    scheduled: int = 0
    leased: int = 0
    done: int = 0
    dead: int = 0
    cancelled: int = 0
    oldest_ready_age_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key entry: a token's hash, or a client certificate's subject, with what it may do.

    `collections` and `workflows` empty on both: the key is not limited to named resources.
    """

    name: str
    scopes: tuple[str, ...]
    collections: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()
    token_hash: str | None = None
    """SHA-256 of the token, hex; None for a certificate entry."""
    subject: str | None = None
    """The client certificate subject this entry admits (mTLS); None for a token key."""
    created_at: float = 0.0
    revoked_at: float | None = None
    last_used_at: float | None = None
    expires_at: float | None = None
    """From this time on the key is refused, as if revoked then; None: it never expires."""


# --- what the storage calls answer: named, and still unpacked as tuples ----------------------------


class CollectionPut(NamedTuple):
    """A collection created, or the one that had the name (`created` False)."""

    collection: Collection
    created: bool


class WorkflowPut(NamedTuple):
    """A workflow's current definition, whether this put stored a new version, and what a
    forced put cancelled in the stages it dropped."""

    workflow: WorkflowDef
    changed: bool
    cancelled: Cancelled | None = None


class Page(NamedTuple, Generic[T]):
    """A page of a listing, and whether more follow it."""

    items: list[T]
    more: bool


class EventPage(NamedTuple):
    """A run's record (without its data) and a page of its events, as (sequence, patch)."""

    run: StoredRun
    events: list[tuple[int, bytes]]


class LiveRunCounts(NamedTuple):
    """A collection's live runs not finished: running (an event lately) and abandoned (none)."""

    running: int
    abandoned: int


class Enqueued(NamedTuple):
    """Tasks created by an enqueue, and runs skipped (one active in the workflow already)."""

    enqueued: int
    skipped: int


class SettledAndLeased(NamedTuple):
    """The answers to a batch of completions, and the tasks leased after them."""

    acks: list[Ack]
    leased: list[LeasedTask]


class Swept(NamedTuple):
    """Leases a sweep ended: past their deadline, and detached and never resumed."""

    expired: list[EndedLease]
    recovered: list[EndedLease]


class RevocationPage(NamedTuple):
    """Revocations recorded after an id, and the id to read after next time."""

    last_id: int
    revocations: list[Revocation]


class Cancelled(NamedTuple):
    """How many tasks a cancel moved, and the leases it ended."""

    cancelled: int
    ended: list[EndedLease]


@dataclass(frozen=True)
class RunSelection:
    """The runs a deletion names: by id, else a collection's runs stored before
    `ingested_before` (epoch seconds; None: all of them)."""

    run_ids: Sequence[str] = ()
    collection_id: str = ""
    ingested_before: float | None = None


class DoomedRun(NamedTuple):
    """A run chosen for deletion."""

    seq: int
    id: str
    collection_id: str


class LeasedTaskOfRun(NamedTuple):
    """A leased task of a run chosen for deletion."""

    task_id: int
    run_id: str
    workflow: str
    stage: str


class Deleted(NamedTuple):
    """What one deletion transaction removed, and whether its selection holds more."""

    run_ids: list[str]
    tasks: int
    """Tasks deleted with the runs, in every workflow."""
    revoked: list[EndedLease]
    """Leases a forced deletion ended (their tasks cancelled, then deleted)."""
    more: bool


class NewSpan(NamedTuple):
    """An OpenTelemetry span of a trace's run, encoded, kept once by its id."""

    span_id: str
    start_ns: int
    data: bytes
    root: bool
    """It has no parent: the trace's run may finish once quiet after it."""


class TraceBatch(NamedTuple):
    """A batch of one trace's spans, for its run in a collection (by name: made if missing, in
    the batch's transaction, so a collection deleted meanwhile is made again, not refused)."""

    run_id: str
    collection: str
    spans: Sequence[NewSpan]


class TraceState(NamedTuple):
    """What a trace's run keeps between batches of its spans."""

    state: bytes | None
    """The assembler's state (opaque here)."""
    root_ended: bool
    finished: bool


Project = Callable[[bytes | None, Sequence[bytes]], tuple[bytes, bytes]]
"""(a trace's state, its new spans in start order) -> (the patch they make of its run, encoded;
the new state)."""

Rebuild = Callable[[str, Sequence[bytes]], "Folded"]
"""(run id, every span of its trace in start order) -> the run finished. Raises InvalidArgument
when the spans make no run that can be stored."""


class SpansOutcome(NamedTuple):
    """What became of a batch of one trace's spans."""

    stored: int
    duplicates: int
    refused: ServerError | None = None
    """Why none was stored (the run's rules: finished, too large, another collection's)."""
    opened: bool = False
    """The batch opened the trace's run."""
