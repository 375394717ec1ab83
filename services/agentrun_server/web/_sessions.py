"""Who is at the console: a session per browser, held by the server (the cookie carries only a
random id), with the API key signed in (under `--auth keys`) and a CSRF token.

The cookie is HttpOnly and SameSite=Strict; every form and htmx request that changes anything
carries the session's CSRF token (a hidden field or the X-CSRF-Token header), and its Origin, when
the browser sends one, must be the console's own. A session with no use for 12 hours ends;
sessions live in the server process (a restart signs everyone out)."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "agentrun_console"
IDLE_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One browser's session."""

    id: str
    csrf: str
    token: str | None = None
    """The API key signed in (None: none yet, or `--auth none`)."""
    last_seen: float = field(default_factory=time.monotonic)

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self.csrf, presented)


class Sessions:
    """The sessions of one console, by id."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def get(self, session_id: str | None) -> Session | None:
        """The live session of a cookie's id (None: none, or it idled out)."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        now = time.monotonic()
        if session is None or now - session.last_seen > IDLE_SECONDS:
            self._by_id.pop(session_id, None)
            return None
        session.last_seen = now
        return session

    def new(self) -> Session:
        """A fresh session. When there are too many, the least recently used tenth goes,
        sessions with no key signed in first: a client opening sessions without end (a sign-in
        form costs none) cannot sign others out."""
        if len(self._by_id) >= MAX_SESSIONS:
            by_use = sorted(self._by_id.values(), key=lambda s: (s.token is not None, s.last_seen))
            for stale in by_use[: MAX_SESSIONS // 10]:
                del self._by_id[stale.id]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        self._by_id[session.id] = session
        return session

    def renew(self, session: Session) -> Session:
        """A new id for a session whose privileges change (signing in or out), so an id seen
        before cannot ride on them (session fixation)."""
        self._by_id.pop(session.id, None)
        fresh = self.new()
        fresh.token = session.token
        return fresh

    def end(self, session: Session) -> None:
        self._by_id.pop(session.id, None)
