"""API key tokens, and the key ring: every key of the database in memory, kept current by polling.

A token is `ark_` and 43 URL-safe characters (32 random bytes); the database holds its SHA-256
only, as GitHub and Stripe store theirs (a random 256-bit token needs no slow hash). Checking a
key is a hash and a dict lookup, once per call or stream, never per run or task.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import secrets
import time

from agentrun_server._errors import ServerError, Unauthenticated
from agentrun_server.auth._principal import Principal
from agentrun_server.serving import cancel_and_wait
from agentrun_server.storage import ApiKeyRecord, Storage

_log = logging.getLogger(__name__)

TOKEN_PREFIX = "ark_"
POLL_SECONDS = 0.25
"""How often a server checks the database for created or revoked keys: a key revoked through
any replica stops working everywhere within this (plus the time a reload takes)."""
TOUCH_SECONDS = 60.0
"""Last-use times are written at most this often, one statement for every key used."""


def _utc(epoch_seconds: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_seconds, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def new_token() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class KeyRefused(Unauthenticated):
    """Credentials that name no live key; `reason` is the label it is counted under."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _principal(record: ApiKeyRecord) -> Principal:
    return Principal(
        record.name, record.scopes, record.collections, record.workflows, record.expires_at
    )


class KeyRing:
    """The live keys of a database, by token hash and by certificate subject.

    Lifecycle: `start()` loads the keys and polls for changes; `shutdown()` stops polling and
    writes the last-use times still pending.
    """

    def __init__(self, storage: Storage, poll_seconds: float = POLL_SECONDS) -> None:
        self._storage = storage
        self._poll_seconds = poll_seconds
        self._version = -1
        self._by_name: dict[str, Principal] = {}
        self._by_hash: dict[str, Principal] = {}
        self._by_subject: dict[str, Principal] = {}
        self._used: dict[str, float] = {}
        self._touched_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """Live keys and certificate entries."""
        return len(self._by_name)

    async def start(self) -> None:
        """Load the keys, then keep them current.

        Raises:
            Unavailable: the database cannot be read.
        """
        await self.reload()
        self._task = asyncio.create_task(self._poll())

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        with contextlib.suppress(ServerError):
            await self._touch()

    def authenticate(self, token: str | None, subjects: tuple[str, ...] = ()) -> Principal:
        """The principal of a bearer token or, with none, of a client certificate subject (in
        the forms the server reads it: whole, and "CN=<common name>").

        Raises:
            Unauthenticated: no credentials, or none that name a live key.
        """
        if token:
            principal = self._by_hash.get(hash_token(token))
            if principal is None:
                raise KeyRefused("the API key is unknown or revoked", "unknown_key")
        else:
            principal = next(
                (p for s in subjects if (p := self._by_subject.get(s)) is not None), None
            )
            if principal is None:
                if subjects:
                    raise KeyRefused(
                        f"no live key entry for client certificate {subjects[0]!r}; send an API "
                        "key (authorization: Bearer <token>) or add the subject with "
                        "`agentrun keys create NAME --scope ... --certificate-subject ...`",
                        "unknown_certificate",
                    )
                raise KeyRefused(
                    "this server requires an API key: send `authorization: Bearer <token>` "
                    "(the SDK and CLI read $AGENTRUN_API_KEY)",
                    "no_credentials",
                )
        now = time.time()
        if principal.expires_at is not None and principal.expires_at <= now:
            raise KeyRefused(
                f"the API key {principal.name!r} expired at {_utc(principal.expires_at)}",
                "expired_key",
            )
        self._used[principal.name] = now
        return principal

    async def reload(self) -> None:
        """Re-read the keys if any was created or revoked since the last read.

        Raises:
            Unavailable: the database cannot be read.
        """
        version = await self._storage.keys_version()
        if version == self._version:
            return
        records = await self._storage.list_keys()
        live = {r.name: r for r in records if r.revoked_at is None}
        by_name = {
            name: self._by_name.get(name) or _principal(record) for name, record in live.items()
        }
        gone = [p for name, p in self._by_name.items() if name not in by_name]
        self._by_name = by_name
        self._by_hash = {
            r.token_hash: by_name[r.name] for r in live.values() if r.token_hash is not None
        }
        self._by_subject = {
            r.subject: by_name[r.name] for r in live.values() if r.subject is not None
        }
        self._version = version
        for principal in gone:
            _log.info("API key %r revoked: refusing it from now on", principal.name)
            principal.revoke()

    def expire(self, now: float | None = None) -> None:
        """End the open streams of keys whose expiry has passed (they are refused from then on,
        by `authenticate`)."""
        now = time.time() if now is None else now
        for principal in self._by_name.values():
            if (
                principal.expires_at is not None
                and principal.expires_at <= now
                and not principal.revoked
            ):
                _log.info("API key %r expired: refusing it from now on", principal.name)
                principal.revoke()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            self.expire()
            try:
                await self.reload()
                if time.monotonic() - self._touched_at >= TOUCH_SECONDS:
                    await self._touch()
            except ServerError as exc:
                # Keys known so far keep working; a revocation waits for the database.
                _log.warning("API keys: cannot reload (%s); keeping the %d known", exc, self.count)

    async def _touch(self) -> None:
        used, self._used = self._used, {}
        self._touched_at = time.monotonic()
        if used:
            await self._storage.touch_keys(used)
