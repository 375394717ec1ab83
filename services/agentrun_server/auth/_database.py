"""API keys changed on the database itself, not through a server: how the first admin key is
made (`agentrun keys create admin --scope admin --db URL`), and a way back in if every admin key
is lost. Audited as changes through a server are, the line written by this process."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from agentrun.v1 import key_service_pb2 as pb
from agentrun_server.auth._audit import audit, audit_log
from agentrun_server.auth._servicer import audit_created, key_to_proto, new_key
from agentrun_server.storage import open_storage


async def create_key_on_database(
    db: str,
    name: str,
    scopes: Sequence[str],
    collections: Sequence[str] = (),
    workflows: Sequence[str] = (),
    certificate_subject: str = "",
    expires_at: float | None = None,
) -> pb.CreateApiKeyResponse:
    """Create a key as `CreateApiKey` does (every server sees it within a second).

    Raises:
        InvalidArgument, AlreadyExists: as `CreateApiKey`; Unavailable: the database.
    """
    audit_log.setLevel(logging.INFO)
    storage = await open_storage(db)
    try:
        record, token = new_key(
            name, scopes, collections, workflows, certificate_subject, expires_at=expires_at
        )
        stored = await storage.create_key(record)
        audit_created(stored, via="database")
        return pb.CreateApiKeyResponse(key=key_to_proto(stored), token=token)
    finally:
        await storage.close()


async def list_keys_on_database(db: str) -> list[pb.ApiKey]:
    """Every key of the database, revoked ones included."""
    storage = await open_storage(db)
    try:
        return [key_to_proto(k) for k in await storage.list_keys()]
    finally:
        await storage.close()


async def revoke_key_on_database(db: str, name: str) -> pb.ApiKey:
    """Revoke a key as `RevokeApiKey` does (every server refuses it within a second).

    Raises:
        NotFound: no key of this name.
    """
    audit_log.setLevel(logging.INFO)
    storage = await open_storage(db)
    try:
        revoked = await storage.revoke_key(name, time.time())
        audit("keys.revoke", via="database", name=revoked.name)
        return key_to_proto(revoked)
    finally:
        await storage.close()
