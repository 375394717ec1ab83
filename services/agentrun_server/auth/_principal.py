"""Who a call comes from, what its key may do, and the one table from RPC to scope."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar

from google.protobuf.descriptor import ServiceDescriptor

from agentrun.v1 import (
    ingestion_service_pb2,
    key_service_pb2,
    options_pb2,
    orchestrator_service_pb2,
)
from agentrun_server._errors import PermissionDenied
from agentrun_server.serving._reflection import METHODS as REFLECTION_METHODS

SCOPES = ("ingest", "read", "work", "admin")
"""What a key may do. `admin` implies the other three."""

SERVICES = (
    ingestion_service_pb2.DESCRIPTOR.services_by_name["IngestionService"],
    orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    key_service_pb2.DESCRIPTOR.services_by_name["KeyService"],
)
"""The services whose methods carry their scopes in the contract (`(agentrun.v1.scopes)`)."""

FOREIGN_METHOD_SCOPES = {
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export": ("ingest",),
    "/opentelemetry.proto.collector.logs.v1.LogsService/Export": ("ingest",),
}
"""Methods of services that are not our contract, and the scopes that admit them: the OTLP
receiver (an exporter sends the key as its `authorization` header)."""

ANY_SCOPE_METHODS = REFLECTION_METHODS
"""Methods any live key may call: server reflection (the contract is no secret, but a server
with keys on says it only to its clients)."""


def method_scopes(services: Iterable[ServiceDescriptor] = SERVICES) -> dict[str, tuple[str, ...]]:
    """The table from full method name to the scopes that admit it, read from the contract.

    Raises:
        ValueError: a method declares no scope, or one not in SCOPES (a contract bug).
    """
    table: dict[str, tuple[str, ...]] = {}
    for service in services:
        for method in service.methods:
            scopes = tuple(method.GetOptions().Extensions[options_pb2.scopes])
            if not scopes or not set(scopes) <= set(SCOPES):
                raise ValueError(f"{method.full_name}: (agentrun.v1.scopes) {scopes} is not valid")
            table[f"/{service.full_name}/{method.name}"] = scopes
    for name in ANY_SCOPE_METHODS:
        table[name] = SCOPES
    table.update(FOREIGN_METHOD_SCOPES)
    return table


METHOD_SCOPES: dict[str, tuple[str, ...]] = method_scopes()
"""The scopes each RPC accepts (any one of them), from the contract. A method not here is refused
to every key (fail closed); the health service needs none."""

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods served without credentials: load balancers and orchestrators probe health."""


class Principal:
    """A caller: the key it presented, with the scopes and limits stored with it.

    A key limited to collections sees those; limited to workflows, it sees those and the
    collections bound to them. Neither list: it sees everything its scopes allow.
    """

    __slots__ = (
        "_watchers",
        "collections",
        "expires_at",
        "name",
        "revoked",
        "scopes",
        "workflows",
    )

    def __init__(
        self,
        name: str,
        scopes: Iterable[str],
        collections: Iterable[str] = (),
        workflows: Iterable[str] = (),
        expires_at: float | None = None,
    ) -> None:
        self.name = name
        self.expires_at = expires_at
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
                f"{what} needs a key not limited to collections or workflows; {self.limits_text()}"
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
            raise PermissionDenied(f"{field}: {target} is outside {self.limits_text()}")

    def check_collection(self, name: str, workflow: str = "", field: str = "collection") -> None:
        """Raises PermissionDenied unless the key may touch the collection."""
        if not self.sees_collection(name, workflow):
            raise PermissionDenied(f"{field}: collection {name!r} is outside {self.limits_text()}")

    def limits_text(self) -> str:
        """The key's limits in words, for messages."""
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
        """Mark the key revoked (or expired) and tell its open streams."""
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
