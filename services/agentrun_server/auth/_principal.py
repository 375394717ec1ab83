"""Who a call comes from, what its key may do, and the one table from RPC to scope."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar

from agentrun_server._errors import PermissionDenied

SCOPES = ("ingest", "read", "work", "admin")
"""What a key may do. `admin` implies the other three."""

_INGESTION = "/agentrun.v1.IngestionService/"
_ORCHESTRATOR = "/agentrun.v1.OrchestratorService/"
_KEYS = "/agentrun.v1.KeyService/"

METHOD_SCOPES: dict[str, tuple[str, ...]] = {
    _INGESTION + "CreateCollection": ("ingest",),
    _INGESTION + "UploadAgentRuns": ("ingest",),
    _INGESTION + "StreamAgentRunEvents": ("ingest",),
    _INGESTION + "GetCollection": ("read", "ingest"),  # the writer checks its collection
    _INGESTION + "ListCollections": ("read",),
    _INGESTION + "GetAgentRun": ("read",),
    _INGESTION + "ListAgentRuns": ("read",),
    _INGESTION + "CountAgentRuns": ("read",),
    _INGESTION + "WatchAgentRun": ("read",),
    _ORCHESTRATOR + "ApplyWorkflow": ("admin",),
    _ORCHESTRATOR + "GetWorkflow": ("read", "work"),  # the Runner reads its workflow
    _ORCHESTRATOR + "ListWorkflows": ("read",),
    _ORCHESTRATOR + "EnqueueAgentRuns": ("admin",),
    _ORCHESTRATOR + "Work": ("work",),
    _ORCHESTRATOR + "GetTask": ("read", "work"),
    _ORCHESTRATOR + "ListTasks": ("read",),
    _ORCHESTRATOR + "RedriveTasks": ("admin",),
    _ORCHESTRATOR + "CancelTasks": ("admin",),
    _ORCHESTRATOR + "GetBacklog": ("read",),
    _KEYS + "CreateApiKey": ("admin",),
    _KEYS + "ListApiKeys": ("admin",),
    _KEYS + "RevokeApiKey": ("admin",),
}
"""The scopes each RPC accepts (any one of them). A method not here (server reflection) needs a
known key of any scope; the health service needs none."""

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods served without credentials: load balancers and orchestrators probe health."""


class Principal:
    """A caller: the key it presented, with the scopes and limits stored with it.

    A key limited to collections sees those; limited to workflows, it sees those and the
    collections bound to them. Neither list: it sees everything its scopes allow.
    """

    __slots__ = ("_watchers", "collections", "name", "revoked", "scopes", "workflows")

    def __init__(
        self,
        name: str,
        scopes: Iterable[str],
        collections: Iterable[str] = (),
        workflows: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.scopes = frozenset(SCOPES if "admin" in scopes else scopes)
        self.collections = frozenset(collections)
        self.workflows = frozenset(workflows)
        self.revoked = False
        self._watchers: set[Callable[[], object]] = set()

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, scopes={sorted(self.scopes)})"

    @property
    def limited(self) -> bool:
        """Whether the key is limited to named collections or workflows."""
        return bool(self.collections or self.workflows)

    def require(self, scopes: tuple[str, ...], method: str) -> None:
        """Raises PermissionDenied unless the key has one of `scopes`."""
        if self.scopes.isdisjoint(scopes):
            needed = " or ".join(repr(s) for s in scopes)
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1]} needs scope {needed}; key {self.name!r} has "
                f"{', '.join(sorted(self.scopes)) or 'none'}"
            )

    def require_unlimited(self, what: str) -> None:
        """Raises PermissionDenied when the key is limited to collections or workflows."""
        if self.limited:
            raise PermissionDenied(
                f"{what} needs a key not limited to collections or workflows; {self._limits()}"
            )

    def sees_workflow(self, name: str) -> bool:
        return not self.limited or name in self.workflows

    def sees_collection(self, name: str, workflow: str = "") -> bool:
        """Whether the key may touch the collection `name`, bound to `workflow` ("" for none)."""
        return (
            not self.limited
            or name in self.collections
            or (workflow != "" and workflow in self.workflows)
        )

    def check_workflow(self, name: str, field: str = "workflow") -> None:
        """Raises PermissionDenied unless the key may touch workflow `name` ("" means every
        workflow: only an unlimited key may)."""
        if not self.sees_workflow(name) or (not name and self.limited):
            target = f"workflow {name!r}" if name else "every workflow (no workflow named)"
            raise PermissionDenied(f"{field}: {target} is outside {self._limits()}")

    def check_collection(self, name: str, workflow: str = "", field: str = "collection") -> None:
        """Raises PermissionDenied unless the key may touch the collection."""
        if not self.sees_collection(name, workflow):
            raise PermissionDenied(f"{field}: collection {name!r} is outside {self._limits()}")

    def _limits(self) -> str:
        parts = []
        if self.collections:
            parts.append(f"collections {', '.join(sorted(self.collections))}")
        if self.workflows:
            parts.append(f"workflows {', '.join(sorted(self.workflows))}")
        return f"key {self.name!r}'s limits ({'; '.join(parts)})" if parts else "no limits"

    @contextlib.contextmanager
    def watch(self, on_revoke: Callable[[], object]) -> Iterator[None]:
        """Call `on_revoke()` if the key is revoked while the block runs (a long stream ends)."""
        self._watchers.add(on_revoke)
        try:
            yield
        finally:
            self._watchers.discard(on_revoke)

    def revoke(self) -> None:
        """Mark the key revoked and tell its open streams."""
        self.revoked = True
        for on_revoke in list(self._watchers):
            on_revoke()


ANYONE = Principal("", SCOPES)
"""The caller of a server that checks no credentials (`--auth none`)."""

_current: ContextVar[Principal] = ContextVar("agentrun_principal", default=ANYONE)


def caller() -> Principal:
    """The principal of the call being served (ANYONE when auth is off)."""
    return _current.get()


def set_caller(principal: Principal) -> None:
    """Set the principal for the rest of the call being served (its task's context)."""
    _current.set(principal)
