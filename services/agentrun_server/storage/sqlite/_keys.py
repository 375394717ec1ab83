"""Statements on API keys."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

from agentrun_server._errors import AlreadyExists, NotFound
from agentrun_server.storage._types import ApiKeyRecord
from agentrun_server.storage.sqlite._engine import transaction

_COLUMNS = (
    "name, scopes, collections, workflows, token_hash, subject, created_at, revoked_at, "
    "last_used_at, expires_at"
)


def _record(row: tuple[object, ...]) -> ApiKeyRecord:
    name, scopes, collections, workflows, *rest = row
    return ApiKeyRecord(
        str(name),
        tuple(json.loads(str(scopes))),
        tuple(json.loads(str(collections))),
        tuple(json.loads(str(workflows))),
        *rest,  # type: ignore[arg-type]
    )


def create_key(db: sqlite3.Connection, key: ApiKeyRecord) -> ApiKeyRecord:
    """See `Storage.create_key`."""
    with transaction(db):
        row = db.execute(
            f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?) "
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
        ).fetchone()
    if row is None:
        what = f"a key named {key.name!r}"
        if key.subject is not None:
            what += f" or a live entry for subject {key.subject!r}"
        raise AlreadyExists(f"{what} exists already (revoked keys keep their names)")
    return _record(row)


def list_keys(db: sqlite3.Connection) -> list[ApiKeyRecord]:
    """See `Storage.list_keys`."""
    return [_record(r) for r in db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY name")]


def revoke_key(db: sqlite3.Connection, name: str, now: float) -> ApiKeyRecord:
    """See `Storage.revoke_key`."""
    with transaction(db):
        db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (now, name)
        )
        row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no API key named {name!r}")
    return _record(row)


def keys_version(db: sqlite3.Connection) -> int:
    """See `Storage.keys_version`."""
    return int(db.execute("SELECT count(*) + count(revoked_at) FROM api_keys").fetchone()[0])


def touch_keys(db: sqlite3.Connection, used: Mapping[str, float]) -> None:
    """See `Storage.touch_keys`."""
    with transaction(db):
        db.executemany(
            "UPDATE api_keys SET last_used_at = ? WHERE name = ? "
            "AND (last_used_at IS NULL OR last_used_at < ?)",
            [(at, name, at) for name, at in used.items()],
        )
