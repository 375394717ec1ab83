"""`agentrun collections ...`: list, create, update (retention) and delete collections.

    agentrun collections list
    agentrun collections create airline --workflow grading --retention-days 30
    agentrun collections update airline --retention-days 0      # keep runs until deleted
    agentrun collections delete airline                          # asks; --yes in scripts

Deleting needs an `admin` key, and is refused while a task of one of the runs is leased unless
`--force` (which cancels those tasks, revoking their leases).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc

from agentrun._client import Client
from agentrun._connection import connection_from_arguments
from agentrun._errors import RpcError
from agentrun._records import Collection, Deletion
from agentrun._terminal import safe_text


def add_collections_commands(
    commands: Any, add_server: Callable[[argparse.ArgumentParser], None]
) -> None:
    collections = commands.add_parser(
        "collections", help="list, create, update or delete collections"
    )
    sub = collections.add_subparsers(dest="collections_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="every collection: runs, workflow, retention")
    listing.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    add_server(listing)
    create = sub.add_parser(
        "create", help="create a collection (or show the one of that name, as it was made)"
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--workflow", default="", help="the workflow its runs enter")
    create.add_argument("--description", default="")
    create.add_argument(
        "--retention-days",
        type=int,
        default=0,
        metavar="DAYS",
        help="delete each run this many days after it is stored [default: 0, keep]",
    )
    create.add_argument(
        "--enter-on-abandon",
        action="store_true",
        help="live runs enter the workflow when abandoned too, not only when they finish",
    )
    add_server(create)
    update = sub.add_parser("update", help="change a collection's retention or description")
    update.add_argument("collection", metavar="COLLECTION", help="collection name or id")
    update.add_argument(
        "--retention-days",
        type=int,
        metavar="DAYS",
        help="delete each run this many days after it is stored (0: keep until deleted)",
    )
    update.add_argument("--description")
    add_server(update)
    delete = sub.add_parser(
        "delete",
        help="delete a collection with its runs and their tasks",
        description="Delete a collection with its runs (their events and scores) and their "
        "tasks in every workflow; its name is free again. Needs an admin key; audited.",
    )
    delete.add_argument("collection", metavar="COLLECTION", help="collection name or id")
    add_deletion_flags(delete)
    add_server(delete)


def add_deletion_flags(parser: argparse.ArgumentParser) -> None:
    """`--force` and `--yes`, as every deleting command takes them."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="cancel the runs' leased tasks (revoking the leases) rather than refuse",
    )
    parser.add_argument(
        "--yes", action="store_true", help="do not ask (needed when not at a terminal)"
    )


def run_collections_command(args: argparse.Namespace) -> int:
    with Client(connection=connection_from_arguments(args)) as client:
        command = args.collections_command
        if command == "list":
            return _list(client, args)
        if command == "create":
            made = client.create_collection(
                args.name,
                args.description,
                args.workflow,
                enter_workflow_on_abandon=args.enter_on_abandon,
                retention_days=args.retention_days,
            )
            print(("created " if made.created else "exists, as made: ") + _line(made.collection))
            return 0
        if command == "update":
            if args.retention_days is None and args.description is None:
                print(
                    "agentrun collections update: nothing to change: give --retention-days or "
                    "--description",
                    file=sys.stderr,
                )
                return 2
            collection = find_collection(client, args.collection)
            updated = client.update_collection(
                collection.id, description=args.description, retention_days=args.retention_days
            )
            print("updated " + _line(updated))
            return 0
        return _delete(client, args)


def find_collection(client: Client, key: str) -> Collection:
    """A collection by name, else by id."""
    try:
        return client.get_collection(name=key)
    except RpcError as exc:
        if exc.code != grpc.StatusCode.NOT_FOUND:
            raise
    try:
        return client.get_collection(key)
    except RpcError as exc:
        if exc.code != grpc.StatusCode.NOT_FOUND:
            raise
        known = ", ".join(repr(c.name) for c in client.list_collections()) or "none yet"
        raise RpcError(exc.code, f"no collection named {key!r}; collections: {known}") from exc


def _retention(collection: Collection) -> str:
    days = collection.retention_days
    return f"kept {days} day{'s' if days != 1 else ''}" if days else "kept until deleted"


def _line(collection: Collection) -> str:
    bound = f", workflow {safe_text(collection.workflow)}" if collection.workflow else ""
    return (
        f"{safe_text(collection.name)} ({collection.id}): {collection.run_count:,} runs{bound}, "
        f"{_retention(collection)}"
    )


def _list(client: Client, args: argparse.Namespace) -> int:
    collections = client.list_collections()
    if args.json:
        print(json.dumps([c.model_dump(mode="json") for c in collections]))
        return 0
    print(f"{'collection':<24} {'runs':>10}  {'workflow':<16} retention  id")
    for c in collections:
        retention = f"{c.retention_days} d" if c.retention_days else "-"
        print(
            f"{safe_text(c.name):<24} {c.run_count:>10,}  {safe_text(c.workflow) or '-':<16} "
            f"{retention:<10} {c.id}"
        )
    if not collections:
        print("(no collections)")
    return 0


def confirmed(question: str, answer: str, args: argparse.Namespace, command: str) -> bool:
    """Whether a destructive command may go on: `--yes`, or `answer` typed at the terminal;
    said on stderr when not."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(
            f"agentrun {command}: {question}? add --yes to confirm (not at a terminal); nothing "
            "was deleted",
            file=sys.stderr,
        )
        return False
    typed = input(f"{question}?\ntype {answer!r} to confirm: ").strip()
    if typed != answer:
        print(f"agentrun {command}: not confirmed; nothing was deleted", file=sys.stderr)
        return False
    return True


def said(deletion: Deletion) -> str:
    """What a deletion removed, in one line."""
    revoked = (
        f", {deletion.revoked_lease_count} leases revoked" if deletion.revoked_lease_count else ""
    )
    return (
        f"{deletion.deleted_run_count:,} runs and {deletion.deleted_task_count:,} tasks "
        f"deleted{revoked}"
    )


def _delete(client: Client, args: argparse.Namespace) -> int:
    collection = find_collection(client, args.collection)
    question = (
        f"delete collection {safe_text(collection.name)!r} with its {collection.run_count:,} "
        "runs and their tasks"
    )
    if not confirmed(question, collection.name, args, "collections delete"):
        return 1
    deletion = client.delete_collection(collection.id, force=args.force)
    print(f"collection {safe_text(collection.name)!r} deleted: {said(deletion)}")
    return 0
