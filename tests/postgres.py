"""Real PostgreSQL for tests: a fresh database per test, created and dropped here.

The server is $AGENTRUN_TEST_POSTGRES (default: the local one, trust auth). Where none answers,
tests that need it skip with the reason, unless $AGENTRUN_REQUIRE_POSTGRES is set (CI sets it on
machines that run one: there, a missing PostgreSQL fails the run).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ADMIN_URL = os.environ.get(
    "AGENTRUN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _unavailable(why: str) -> None:
    message = f"no PostgreSQL at {ADMIN_URL} ({why}); set AGENTRUN_TEST_POSTGRES"
    if os.environ.get("AGENTRUN_REQUIRE_POSTGRES"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    try:
        import psycopg
    except ImportError as exc:
        _unavailable(f"psycopg is not installed: {exc}")
    name = f"agentrun_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable(str(exc).strip())
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            base = ADMIN_URL.rsplit("/", 1)[0]
            yield f"{base}/{name}"
        finally:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
