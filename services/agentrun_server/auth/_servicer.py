"""KeyService: create, list and revoke API keys through a running server (admin keys only)."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agentrun.v1 import key_service_pb2 as pb
from agentrun.v1 import key_service_pb2_grpc as pb_grpc
from agentrun_server._checks import check_count, check_reference
from agentrun_server._errors import InvalidArgument
from agentrun_server.auth._audit import audit
from agentrun_server.auth._keys import hash_token, new_token
from agentrun_server.auth._principal import SCOPES, caller
from agentrun_server.serving import epoch_seconds, to_timestamp
from agentrun_server.storage import ApiKeyRecord, Storage

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_LIMITS = 100
"""Most collections, and most workflows, one key may be limited to."""


def new_key(
    name: str,
    scopes: Sequence[str],
    collections: Sequence[str] = (),
    workflows: Sequence[str] = (),
    subject: str = "",
    now: float | None = None,
    expires_at: float | None = None,
) -> tuple[ApiKeyRecord, str]:
    """A checked key entry and its token ("" for a certificate entry), not yet stored;
    `expires_at` (epoch seconds, in the future) ends it then.

    Raises:
        InvalidArgument: a bad name, an unknown or missing scope, too many limits, an expiry
            not in the future.
    """
    now = time.time() if now is None else now
    if expires_at is not None and expires_at <= now:
        raise InvalidArgument("expire_time: must be in the future")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"name: {name!r}; use 1 to 128 letters, digits, '.', '_' or '-'")
    if not scopes:
        raise InvalidArgument(f"scopes: at least one of {', '.join(SCOPES)} is required")
    for i, scope in enumerate(scopes):
        if scope not in SCOPES:
            raise InvalidArgument(f"scopes[{i}]: {scope!r}; choose from {', '.join(SCOPES)}")
    for field, names in (("collections", collections), ("workflows", workflows)):
        check_count(field, names, MAX_LIMITS)
        for i, item in enumerate(names):
            check_reference(f"{field}[{i}]", item, required=True)
    if len(subject.encode()) > 1024:
        raise InvalidArgument("certificate_subject: over 1,024 bytes")
    token = "" if subject else new_token()
    record = ApiKeyRecord(
        name,
        tuple(dict.fromkeys(scopes)),
        tuple(dict.fromkeys(collections)),
        tuple(dict.fromkeys(workflows)),
        hash_token(token) if token else None,
        subject or None,
        now,
        expires_at=expires_at,
    )
    return record, token


def audit_created(record: ApiKeyRecord, **how: Any) -> None:
    """The audit line of a key created (through a server, or `how` says otherwise)."""
    audit(
        "keys.create",
        **how,
        name=record.name,
        scopes=list(record.scopes),
        collections=list(record.collections),
        workflows=list(record.workflows),
        certificate_subject=record.subject,
        expires_at=record.expires_at,
    )


def key_to_proto(record: ApiKeyRecord) -> pb.ApiKey:
    key = pb.ApiKey(
        name=record.name,
        scopes=record.scopes,
        collections=record.collections,
        workflows=record.workflows,
        certificate_subject=record.subject or "",
        create_time=to_timestamp(record.created_at),
    )
    if record.revoked_at is not None:
        key.revoke_time.CopyFrom(to_timestamp(record.revoked_at))
    if record.last_used_at is not None:
        key.last_use_time.CopyFrom(to_timestamp(record.last_used_at))
    if record.expires_at is not None:
        key.expire_time.CopyFrom(to_timestamp(record.expires_at))
    return key


class KeyServicer(pb_grpc.KeyServiceServicer):
    """Serves `agentrun.v1.KeyService` over a `Storage`; `on_change` (this server's key ring
    reload) runs after a create or revoke, so this server applies it at once (others poll)."""

    def __init__(
        self, storage: Storage, on_change: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._storage = storage
        self._on_change = on_change

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Any) -> Any:
        caller().require_unlimited("CreateApiKey")
        k = request.key
        record, token = new_key(
            k.name,
            list(k.scopes),
            list(k.collections),
            list(k.workflows),
            k.certificate_subject,
            expires_at=epoch_seconds(k.expire_time) if k.HasField("expire_time") else None,
        )
        stored = await self._storage.create_key(record)
        await self._changed()
        audit_created(stored)
        return pb.CreateApiKeyResponse(key=key_to_proto(stored), token=token)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Any) -> Any:
        caller().require_unlimited("ListApiKeys")
        return pb.ListApiKeysResponse(
            keys=[key_to_proto(k) for k in await self._storage.list_keys()]
        )

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Any) -> Any:
        caller().require_unlimited("RevokeApiKey")
        name = check_reference("name", request.name, required=True)
        record = await self._storage.revoke_key(name, time.time())
        await self._changed()
        audit("keys.revoke", name=name)
        return pb.RevokeApiKeyResponse(key=key_to_proto(record))
