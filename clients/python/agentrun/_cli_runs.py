"""`agentrun runs list COLLECTION`, `agentrun runs show RUN_ID` and `agentrun runs delete`:
finding, reading and deleting runs without code.

    agentrun runs list airline --where 'scores.reward < 1' --where 'metadata.model = gpt-4o'
    agentrun runs list airline --live            # running now: a live run's id for `tail`
    agentrun runs show RUN_ID                    # its transcripts rendered for reading
    agentrun runs delete --collection airline --older-than 30d

Newest first, a page at a time (`--limit`, then the `--page-token` the page ends with); `--json`
for scripts. Filters run on the server's index (`Client.list_runs`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from agentrun._cli_collections import add_deletion_flags, confirmed, find_collection, said
from agentrun._client import Client
from agentrun._connection import connection_from_arguments
from agentrun._records import ListedRun
from agentrun._terminal import safe_text
from agentrun._workflow import parse_duration
from agentrun.chat import AssistantMessage, ChatMessage, ContentText, ToolMessage

STATES = ("running", "finished", "abandoned")


def add_runs_commands(commands: Any, add_server: Callable[[argparse.ArgumentParser], None]) -> None:
    runs = commands.add_parser("runs", help="list a collection's runs, or show one")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    listing = runs_commands.add_parser(
        "list",
        help="a collection's runs, newest first, filtered by state, score and metadata",
        description="List a collection's runs, newest first, a page at a time. Filters (all "
        "must hold) compare a score or a top-level metadata field: 'scores.reward < 1', "
        "'metadata.model = gpt-4o', 'scores.correct = true' (= != < <= > >=; a string by = "
        "and != only; quote a string that reads as a number: 'metadata.version = \"2\"').",
    )
    listing.add_argument("collection", metavar="COLLECTION", help="collection name or id")
    listing.add_argument(
        "--where", action="append", default=[], metavar="EXPR", help="a filter (repeatable)"
    )
    listing.add_argument("--state", choices=STATES, help="only runs in this state")
    listing.add_argument(
        "--live", action="store_true", help="only live runs running now (--state running)"
    )
    listing.add_argument("--oldest-first", action="store_true", help="in ingestion order")
    listing.add_argument("--limit", type=int, default=50, help="runs per page [default: 50]")
    listing.add_argument("--page-token", default="", help="the page after the one that ended so")
    listing.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    add_server(listing)
    delete = runs_commands.add_parser(
        "delete",
        help="delete runs by id, or a collection's runs older than an age",
        description="Delete runs with their tasks in every workflow: by id, or a collection's "
        "runs stored longer ago than --older-than. Needs an admin key; audited. Refused while a "
        "task of a run is leased, unless --force.",
    )
    delete.add_argument("agent_run_ids", nargs="*", metavar="RUN_ID")
    delete.add_argument("--collection", help="with --older-than: the collection (name or id)")
    delete.add_argument(
        "--older-than", metavar="AGE", help="with --collection: stored longer ago than this (30d)"
    )
    add_deletion_flags(delete)
    add_server(delete)
    show = runs_commands.add_parser(
        "show", help="one run: its metadata, scores and transcripts rendered for reading"
    )
    show.add_argument("agent_run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true", help="the run as JSON")
    add_server(show)


def run_runs_command(args: argparse.Namespace) -> int:
    with Client(connection=connection_from_arguments(args)) as client:
        if args.runs_command == "show":
            return _show(client, args)
        if args.runs_command == "delete":
            return _delete(client, args)
        return _list(client, args)


def _delete(client: Client, args: argparse.Namespace) -> int:
    by_age = args.collection is not None or args.older_than is not None
    if bool(args.agent_run_ids) == by_age or (
        by_age and (args.collection is None or args.older_than is None)
    ):
        print(
            "agentrun runs delete: name runs (RUN_ID ...), or --collection C --older-than AGE",
            file=sys.stderr,
        )
        return 2
    if not by_age:
        deletion = client.delete_runs(args.agent_run_ids, force=args.force)
        print(said(deletion))
        for run_id in deletion.not_found_agent_run_ids:
            print(f"  no run {safe_text(run_id)!r} (deleted before, or never stored)")
        return 0
    try:
        age = float(parse_duration(args.older_than))
    except ValueError as exc:
        print(f"agentrun runs delete: --older-than: {exc}", file=sys.stderr)
        return 2
    collection = find_collection(client, args.collection)
    before = datetime.now(UTC) - timedelta(seconds=age)
    question = (
        f"delete the runs of {safe_text(collection.name)!r} stored before "
        f"{before.astimezone():%Y-%m-%d %H:%M:%S} (of its {collection.run_count:,})"
    )
    if not confirmed(question, collection.name, args, "runs delete"):
        return 1
    deletion = client.delete_runs(
        collection_id=collection.id, ingested_before=before, force=args.force
    )
    print(said(deletion))
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    if args.limit < 1:
        print("agentrun runs list: --limit must be at least 1", file=sys.stderr)
        return 2
    collection = find_collection(client, args.collection)
    try:
        page = client.list_runs(
            collection.id,
            where=args.where,
            state="running" if args.live else args.state,
            newest_first=not args.oldest_first,
            page_size=args.limit,
            page_token=args.page_token,
        )
    except ValueError as exc:
        print(f"agentrun runs list: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "collection": collection.name,
                    "runs": [run.model_dump(mode="json") for run in page.runs],
                    "next_page_token": page.next_page_token,
                }
            )
        )
        return 0
    print(f"{'updated':<20} {'state':<10} {'messages':>8}  {'scores':<28} run")
    for run in page.runs:
        print(_row(run))
    if not page.runs:
        print("(no runs)")
    if page.next_page_token:
        print(f"-- more: add --page-token {page.next_page_token}")
    return 0


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _row(run: ListedRun) -> str:
    scores = ", ".join(f"{safe_text(k)}={v}" for k, v in sorted(run.scores.items())) or "-"
    name = f"  {safe_text(run.name)}" if run.name else ""
    return (
        f"{_when(run.update_time):<20} {run.state:<10} {run.message_count:>8}  "
        f"{scores[:28]:<28} {safe_text(run.id)}{name}"
    )


def _show(client: Client, args: argparse.Namespace) -> int:
    run = client.get_run(args.agent_run_id)
    if args.json:
        print(run.model_dump_json())
        return 0
    print(f"run {safe_text(run.id)}" + (f": {safe_text(run.name)}" if run.name else ""))
    if run.description:
        print(f"  {safe_text(run.description)}")
    scores = run.metadata.scores
    if scores:
        print("scores: " + ", ".join(f"{safe_text(k)}={v}" for k, v in scores.items()))
    fields = run.metadata.model_dump(mode="json", exclude={"scores"})
    fields = {k: v for k, v in fields.items() if not k.startswith("allow_")}
    if fields:
        text = json.dumps(fields, indent=2, default=str, ensure_ascii=False)
        print("metadata: " + safe_text(text, keep_newlines=True).replace("\n", "\n  "))
    for key, transcript in run.transcripts.items():
        print(f"\n== transcript {safe_text(key)} ({len(transcript.messages)} messages)")
        for number, message in enumerate(transcript.messages, 1):
            print(_message(number, message))
    return 0


def _message(number: int, message: ChatMessage) -> str:
    """A message as `[3] assistant: text`, its tool calls and reasoning beneath it."""
    content = message.content
    if isinstance(content, str):
        text = content
    else:
        text = "".join(
            part.text if isinstance(part, ContentText) else f"[reasoning: {part.reasoning}]"
            for part in content
        )
    role: str = message.role
    if isinstance(message, ToolMessage) and message.function:
        role = f"tool {safe_text(message.function)}"
    lines = [f"[{number}] {role}: {safe_text(text, keep_newlines=True)}"]
    if isinstance(message, AssistantMessage):
        for call in message.tool_calls or ():
            arguments = json.dumps(call.arguments, ensure_ascii=False, default=str)
            lines.append(f"      -> {safe_text(call.function)}({safe_text(arguments)})")
    return "\n".join(lines)
