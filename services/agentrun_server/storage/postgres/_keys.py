"""Statements on API keys."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agentrun_server._errors import AlreadyExists, NotFound
from agentrun_server.storage._types import ApiKeyRecord
from agentrun_server.storage.postgres._engine import Connection

_COLUMNS = (
    "name, scopes, collections, workflows, token_hash, subject, created_at, revoked_at, "
    "last_used_at, expires_at"
)


def _record(row: tuple[Any, ...]) -> ApiKeyRecord:
    name, scopes, collections, workflows, *rest = row
    return ApiKeyRecord(
        name,
        tuple(json.loads(scopes)),
        tuple(json.loads(collections)),
        tuple(json.loads(workflows)),
        *rest,
    )


async def create_key(conn: Connection, key: ApiKeyRecord) -> ApiKeyRecord:
    """See `Storage.create_key`."""
    cursor = await conn.execute(
        f"INSERT INTO api_keys ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, NULL, %s) "
        f"ON CONFLICT DO NOTHING RETURNING {_COLUMNS}",
        (
            key.name,
            json.dumps(key.scopes),
            json.dumps(key.collections),
            json.dumps(key.workflows),
            key.token_hash,
            key.subject,
            key.created_at,
            key.expires_at,
        ),
    )
    row = await cursor.fetchone()
    if row is None:
        what = f"a key named {key.name!r}"
        if key.subject is not None:
            what += f" or a live entry for subject {key.subject!r}"
        raise AlreadyExists(f"{what} exists already (revoked keys keep their names)")
    return _record(row)


async def list_keys(conn: Connection) -> list[ApiKeyRecord]:
    """See `Storage.list_keys`."""
    cursor = await conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY name")
    return [_record(r) for r in await cursor.fetchall()]


async def revoke_key(conn: Connection, name: str, now: float) -> ApiKeyRecord:
    """See `Storage.revoke_key`."""
    await conn.execute(
        "UPDATE api_keys SET revoked_at = %s WHERE name = %s AND revoked_at IS NULL", (now, name)
    )
    cursor = await conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE name = %s", (name,))
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"no API key named {name!r}")
    return _record(row)


async def keys_version(conn: Connection) -> int:
    """See `Storage.keys_version`."""
    cursor = await conn.execute("SELECT count(*) + count(revoked_at) FROM api_keys")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def touch_keys(conn: Connection, used: Mapping[str, float]) -> None:
    """See `Storage.touch_keys`."""
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "UPDATE api_keys SET last_used_at = %s WHERE name = %s "
            "AND (last_used_at IS NULL OR last_used_at < %s)",
            [(at, name, at) for name, at in used.items()],
        )
