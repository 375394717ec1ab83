"""`agentrun keys create|list|revoke`: API keys, through a running server (with an admin key) or
directly on the database (`--db URL`, how the first admin key is made)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import time
from collections.abc import Callable
from typing import Any

from agentrun._client import Client
from agentrun._connection import connection_from_arguments
from agentrun._records import ApiKey, ApiKeyCreated
from agentrun._terminal import safe_text

SCOPES = ("ingest", "read", "work", "admin")


def add_keys_commands(commands: Any, add_server: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = commands.add_parser(
        "keys",
        help="create, list or revoke API keys",
        description="API keys for a server run with --auth keys. Through the server (an admin "
        "key in $AGENTRUN_API_KEY), or with --db directly on its database: that is how the "
        "first admin key is made.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = key_commands.add_parser(
        "create",
        help="create a key and print its token (shown once)",
        description="Create a key. Its token is printed once, alone on stdout "
        "(TOKEN=$(agentrun keys create ...)); the database keeps only its SHA-256.",
    )
    create.add_argument("name")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPES,
        help="ingest: create collections, upload; read: get, list and count runs, tasks, "
        "workflows, backlog; work: the Work stream; admin: workflows, enqueue, redrive, "
        "cancel, keys, and all of the above (repeat for several)",
    )
    create.add_argument(
        "--collection", action="append", default=[], metavar="NAME", help="limit to collection"
    )
    create.add_argument(
        "--workflow",
        action="append",
        default=[],
        metavar="NAME",
        help="limit to workflow (and the collections bound to it)",
    )
    create.add_argument(
        "--expires",
        type=expiry,
        metavar="WHEN",
        help="refuse the key from then on: a duration from now (90d, 12h, 30m) or a UTC date "
        "or time (2027-01-31, 2027-01-31T18:00)",
    )
    create.add_argument(
        "--certificate-subject",
        default="",
        metavar="SUBJECT",
        help='admit a client certificate (mTLS) instead of a token, e.g. "CN=worker-1"',
    )
    key_commands.add_parser("list", help="list keys: scopes, limits, created, last used, revoked")
    revoke = key_commands.add_parser("revoke", help="revoke a key (refused within a second)")
    revoke.add_argument("name")
    for command in key_commands.choices.values():
        command.add_argument(
            "--db",
            metavar="URL",
            help="work on this database directly instead of through a server",
        )
        add_server(command)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def expiry(text: str) -> float:
    """`--expires`: a duration from now ("90d", "12h", "30m", "45s", "2w") or a UTC date or time
    ("2027-01-31", "2027-01-31T18:00", with an offset if not UTC), as epoch seconds.

    Raises:
        argparse.ArgumentTypeError: neither, or not in the future.
    """
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower())
    if unit is not None and text[:-1].replace(".", "", 1).isdigit():
        when = time.time() + float(text[:-1]) * unit
    else:
        try:
            parsed = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a duration (90d, 12h, 30m) or a date (2027-01-31)"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.UTC)
        when = parsed.timestamp()
    if when <= time.time():
        raise argparse.ArgumentTypeError(f"{text!r}: not in the future")
    return when


def _time(when: datetime.datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M")


def _limits(key: ApiKey) -> str:
    parts = [f"collection {safe_text(c)}" for c in key.collections]
    parts += [f"workflow {safe_text(w)}" for w in key.workflows]
    if key.certificate_subject:
        parts.append(f"certificate {safe_text(key.certificate_subject)}")
    return ", ".join(parts) or "-"


async def _on_database(args: argparse.Namespace) -> Any:
    """The command run on the database by the server package (it owns storage and audit)."""
    from agentrun_server.auth import (
        create_key_on_database,
        list_keys_on_database,
        revoke_key_on_database,
    )

    # The server answers in the wire form; shown as the Client's records, one way for both.
    if args.keys_command == "create":
        created = await create_key_on_database(
            args.db,
            args.name,
            args.scope,
            args.collection,
            args.workflow,
            args.certificate_subject,
            args.expires,
        )
        return ApiKeyCreated(key=ApiKey.from_proto(created.key), token=created.token)
    if args.keys_command == "list":
        return [ApiKey.from_proto(key) for key in await list_keys_on_database(args.db)]
    return ApiKey.from_proto(await revoke_key_on_database(args.db, args.name))


def run_keys_command(args: argparse.Namespace) -> int:
    if args.db:
        from agentrun_server import ServerError

        try:
            result = asyncio.run(_on_database(args))
        except ServerError as exc:
            print(f"agentrun keys {args.keys_command}: {exc}", file=sys.stderr)
            return 1
    else:
        with Client(connection=connection_from_arguments(args)) as client:
            if args.keys_command == "create":
                result = client.create_api_key(
                    args.name,
                    args.scope,
                    collections=args.collection,
                    workflows=args.workflow,
                    certificate_subject=args.certificate_subject,
                    expires_at=args.expires,
                )
            elif args.keys_command == "list":
                result = client.list_api_keys()
            else:
                result = client.revoke_api_key(args.name)
    if args.keys_command == "create":
        key = result.key
        print(
            f"agentrun keys create: {key.name} ({', '.join(key.scopes)}; limits: "
            f"{_limits(key)})" + ("; its token, shown this once:" if result.token else ""),
            file=sys.stderr,
        )
        if result.token:
            print(result.token)
    elif args.keys_command == "list":
        rows = [("NAME", "SCOPES", "LIMITS", "CREATED", "LAST USED", "EXPIRES", "REVOKED")]
        rows += [
            (
                k.name,
                ",".join(k.scopes),
                _limits(k),
                _time(k.create_time),
                _time(k.last_use_time),
                _time(k.expire_time),
                _time(k.revoke_time),
            )
            for k in result
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    else:
        print(f"agentrun keys revoke: {result.name} revoked at {_time(result.revoke_time)} UTC")
    return 0
