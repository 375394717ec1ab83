"""API keys."""

from __future__ import annotations

from collections.abc import Mapping

from agentrun_server._errors import AlreadyExists, NotFound
from agentrun_server.storage._statements import Statements
from agentrun_server.storage._types import ApiKeyRecord


async def create_key(db: Statements, key: ApiKeyRecord) -> ApiKeyRecord:
    """See `Storage.create_key`."""
    stored = await db.insert_key(key)
    if stored is None:
        what = f"a key named {key.name!r}"
        if key.subject is not None:
            what += f" or a live entry for subject {key.subject!r}"
        raise AlreadyExists(f"{what} exists already (revoked keys keep their names)")
    return stored


async def list_keys(db: Statements) -> list[ApiKeyRecord]:
    """See `Storage.list_keys`."""
    return await db.keys()


async def revoke_key(db: Statements, name: str, now: float) -> ApiKeyRecord:
    """See `Storage.revoke_key`."""
    await db.revoke_key(name, now)
    key = await db.key(name)
    if key is None:
        raise NotFound(f"no API key named {name!r}")
    return key


async def keys_version(db: Statements) -> int:
    """See `Storage.keys_version`."""
    return await db.keys_version()


async def touch_keys(db: Statements, used: Mapping[str, float]) -> None:
    """See `Storage.touch_keys`."""
    await db.touch_keys(used)
