"""The `agentrun` command: serve, upload, workflow apply, stats.

`serve` is the one place the SDK reaches the server package, imported only when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence

import grpc

from agentrun._cli_collections import add_collections_commands, run_collections_command
from agentrun._cli_keys import add_keys_commands, run_keys_command
from agentrun._cli_runs import add_runs_commands, run_runs_command
from agentrun._cli_tail import add_tail_command, run_tail_command
from agentrun._client import Client
from agentrun._connection import (
    add_connection_arguments,
    connection_from_arguments,
)
from agentrun._errors import AgentRunError, FormatError, RpcError
from agentrun._records import Collection, Task, TaskState, Workflow
from agentrun._terminal import safe_text as _safe
from agentrun._workflow import load_workflow
from agentrun._writer import AgentRunWriter
from agentrun.importers import load_agent_runs

STATE_COLUMNS = ("ready", "scheduled", "leased", "done", "dead", "cancelled")
# What a task's state can be ("scheduled" above is a ready task waiting out its backoff).
TASK_STATES = tuple(state.value for state in TaskState)


def _add_server(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)


def _client(args: argparse.Namespace) -> Client:
    return Client(connection=connection_from_arguments(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentrun", description="Ingest LLM agent runs and take them through workflows."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, about in SERVER_COMMANDS.items():  # run by agentrun_server._cli: see main()
        commands.add_parser(name, help=about, add_help=False)

    upload = commands.add_parser(
        "upload",
        help="upload runs from files (agentrun/Docent JSON or JSONL, Inspect .eval/.json, tau-bench)",
        description="Upload runs from files, detecting each file's format. Every file is read and "
        "checked before anything is sent: a bad record stops the upload, naming the file, the "
        "record and the field, unless --skip-invalid is given.",
    )
    upload.add_argument("paths", nargs="+", metavar="PATH")
    upload.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip records that cannot be read (each is reported on stderr) and upload the rest",
    )
    upload.add_argument("--collection", required=True, help="collection name (created if missing)")
    upload.add_argument("--workflow", default="", help="bind a new collection to this workflow")
    upload.add_argument(
        "--new-ids",
        action="store_true",
        help="store copies under new ids, derived from the collection and each run's own id (so "
        "uploading the same file again still stores nothing twice): for runs stored already "
        "in another collection",
    )
    _add_server(upload)

    workflow = commands.add_parser("workflow", help="manage workflows")
    workflow_commands = workflow.add_subparsers(
        dest="workflow_command", required=True, metavar="COMMAND"
    )
    apply = workflow_commands.add_parser(
        "apply", help="create or update a workflow from a YAML/JSON file"
    )
    apply.add_argument("file")
    apply.add_argument(
        "--force",
        action="store_true",
        help="drop stages that still hold ready or leased tasks, cancelling those tasks",
    )
    _add_server(apply)

    stats = commands.add_parser("stats", help="runs per collection; tasks per stage and state")
    _add_server(stats)

    enqueue = commands.add_parser(
        "enqueue",
        help="send every run of a collection (again) through a workflow, e.g. to re-grade it",
    )
    enqueue.add_argument("workflow")
    enqueue.add_argument("--collection", required=True, metavar="NAME", help="the runs to send")
    enqueue.add_argument("--stage", default="", help="the stage to start at [default: the first]")
    enqueue.add_argument(
        "--priority", type=int, default=0, help="task priority, higher first [default: 0]"
    )
    _add_server(enqueue)

    tasks = commands.add_parser("tasks", help="list, redrive or cancel tasks")
    task_commands = tasks.add_subparsers(dest="tasks_command", required=True, metavar="COMMAND")
    show = task_commands.add_parser(
        "show", help="one task: its state, attempts, pathway, input, output and failed attempts"
    )
    show.add_argument("task_id", metavar="ID")
    _add_server(show)
    for name, help_text in (
        ("list", "list tasks of a workflow (newest last), with their last error"),
        ("redrive", "send dead tasks back to ready (all of a stage, or by id)"),
        ("cancel", "cancel ready, scheduled, leased or dead tasks (all of a stage, or by id)"),
    ):
        command = task_commands.add_parser(name, help=help_text)
        command.add_argument("workflow")
        command.add_argument("--stage", default="", help="only this stage")
        if name == "list":
            command.add_argument("--state", choices=TASK_STATES, help="only tasks in this state")
        else:
            command.add_argument(
                "--task", action="append", default=[], metavar="ID", help="only these tasks"
            )
        _add_server(command)
    add_tail_command(commands, _add_server)
    add_runs_commands(commands, _add_server)
    add_collections_commands(commands, _add_server)
    add_keys_commands(commands, _add_server)
    return parser


_COPIES = uuid.UUID("44dc1182-e33c-43b6-88bf-b9d05300b85c")
"""The namespace of `upload --new-ids`' ids (uuid5 of the collection id and the run's own id)."""


def _upload(args: argparse.Namespace) -> int:
    skipped: list[FormatError] = []
    on_invalid = skipped.append if args.skip_invalid else None
    try:
        runs = [run for path in args.paths for run in load_agent_runs(path, on_invalid=on_invalid)]
    except FormatError as exc:
        print(
            f"agentrun upload: {exc} (nothing was sent; --skip-invalid uploads the valid runs "
            "and lists every invalid one)",
            file=sys.stderr,
        )
        return 1
    for error in skipped:
        print(f"agentrun upload: skipped {error}", file=sys.stderr)
    with _client(args) as client:
        if runs and not args.new_ids:
            elsewhere = _stored_elsewhere(client, runs[0].id, args.collection)
            if elsewhere is not None:
                print(
                    f"agentrun upload: run {_safe(runs[0].id)!r} is stored already, in collection "
                    f"{_safe(elsewhere.name)!r} ({elsewhere.id}), and a run id lives in one "
                    f"collection: nothing was sent. To put those runs through another workflow: "
                    f"agentrun enqueue {_safe(elsewhere.name)} --workflow WORKFLOW; to store "
                    f"copies in {_safe(args.collection)!r}: add --new-ids",
                    file=sys.stderr,
                )
                return 1
        collection = client.create_collection(args.collection, workflow=args.workflow).collection
    if args.new_ids:
        runs = [
            run.model_copy(update={"id": str(uuid.uuid5(_COPIES, f"{collection.id}/{run.id}"))})
            for run in runs
        ]
    # Each rejection is printed below: the writer's own log of them would say it twice.
    logging.getLogger("agentrun._writer").setLevel(logging.ERROR)
    writer = AgentRunWriter(collection.id, connection=connection_from_arguments(args))
    writer.log_agent_runs(runs)
    summary = writer.finish()
    read = f"{len(runs)} runs read" + (f" ({len(skipped)} invalid skipped)" if skipped else "")
    print(
        f"{read}; {summary.accepted} stored, {summary.duplicates} duplicates, "
        f"{len(summary.rejected)} rejected, {summary.undelivered} undelivered "
        f"(collection {collection.name!r}, {collection.id})"
    )
    for rejected in summary.rejected:
        print(
            f"  rejected {_safe(rejected.agent_run_id)}: {rejected.reason}: "
            f"{_safe(rejected.message)}"
        )
    for message in summary.errors:
        print(f"  error: {_safe(message)}")
    return 0 if summary.ok else 1


def _stored_elsewhere(client: Client, run_id: str, collection_name: str) -> Collection | None:
    """The collection other than `collection_name` that holds the run `run_id`, if one does."""
    try:
        stored = client.get_run_summary(run_id)
    except RpcError as exc:
        if exc.code == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    holder = client.get_collection(stored.collection_id)
    return None if holder.name == collection_name else holder


def _apply(args: argparse.Namespace) -> int:
    spec = load_workflow(args.file)
    with _client(args) as client:
        try:
            before: Workflow | None = client.get_workflow(spec.name)
        except RpcError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            before = None
        response = client.apply_workflow(spec, force=args.force)
    w = response.workflow
    state = "applied" if response.changed else "unchanged"
    print(
        f"workflow {_safe(w.name)!r} {state} (version {w.version}): "
        + " -> ".join(_safe(s.name) for s in w.stages)
    )
    if response.changed and before is not None:
        for change in _changes(before, w):
            print(f"  {_safe(change)}")
    if response.cancelled_count:
        print(f"  {response.cancelled_count} tasks of the dropped stages cancelled")
    return 0


def _number(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


_POLICIES = ("max_attempts", "lease_seconds", "initial_backoff_seconds", "max_backoff_seconds")


def _changes(before: Workflow, after: Workflow) -> list[str]:
    """What a new version changed, a line each: stages added and dropped, pathways and policies
    changed (from the stored definitions, every policy filled in)."""
    old = {s.name: s for s in before.stages}
    new = {s.name: s for s in after.stages}
    lines = [f"+ stage {name!r}" for name in new if name not in old]
    lines += [f"- stage {name!r}" for name in old if name not in new]
    for name, stage in new.items():
        was = old.get(name)
        if was is None:
            continue
        if was.pathways != stage.pathways:
            lines.append(f"stage {name!r}: pathways {was.pathways} -> {stage.pathways}")
        for policy in _POLICIES:
            a, b = getattr(was, policy), getattr(stage, policy)
            if a != b:
                lines.append(f"stage {name!r}: {policy} {_number(a)} -> {_number(b)}")
    if [s.name for s in before.stages][:1] != [s.name for s in after.stages][:1]:
        lines.append(f"runs now enter at {after.stages[0].name!r}")
    return lines


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        collections = client.list_collections()
        backlog = client.backlog()
    print("collections:")
    for c in collections:
        bound = f" -> workflow {_safe(c.workflow)}" if c.workflow else ""
        print(f"  {_safe(c.name):<24} {c.run_count:>8} runs{bound}")
    if not collections:
        print("  (none)")
    print("tasks:")
    header = (
        f"  {'workflow/stage':<32}" + "".join(f"{h:>10}" for h in STATE_COLUMNS) + "  oldest ready"
    )
    print(header)
    for s in backlog:
        counts = (
            s.ready_count,
            s.scheduled_count,
            s.leased_count,
            s.done_count,
            s.dead_count,
            s.cancelled_count,
        )
        age = s.oldest_ready_age_seconds
        print(
            f"  {_safe(s.workflow + '/' + s.stage):<32}"
            + "".join(f"{n:>10}" for n in counts)
            + (f"  {age:.1f} s" if age else "  -")
        )
    if not backlog:
        print("  (no workflows)")
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    with _client(args) as client:
        collection = client.get_collection(name=args.collection)
        enqueued, skipped = client.enqueue_runs(
            args.workflow, client.iter_run_ids(collection.id), args.stage, args.priority
        )
    print(
        f"{enqueued} runs of {args.collection!r} enqueued into {args.workflow!r}"
        + (f"; {skipped} skipped (a task of theirs is ready or leased already)" if skipped else "")
    )
    return 0


def _show_task(task: Task) -> None:
    print(f"task {task.id}: {_safe(task.workflow)}/{_safe(task.stage)}, {task.state}")
    print(f"  run          {_safe(task.agent_run_id)} (collection {_safe(task.collection_id)})")
    print(f"  attempt      {task.attempt} of {task.max_attempts}; priority {task.priority}")
    if task.state is TaskState.DONE:
        print(f"  pathway      {_safe(task.pathway) or '(end)'}")
    if task.previous_task_id:
        print(f"  after task   {task.previous_task_id}")
    if task.holder is not None:
        held = "held by" if task.state is TaskState.LEASED else "done by"
        print(f"  {held:<12} {_safe(str(task.holder))}")
    for label, value in (("input", task.input), ("output", task.output)):
        if value is not None:
            text = json.dumps(value, indent=2, default=str)
            print(f"  {label:<12} " + text.replace("\n", "\n" + " " * 15))
    for failure in task.failures:
        error = _safe(failure.error, keep_newlines=True).replace("\n", "\n" + " " * 4)
        by = f" (held by {_safe(str(failure.holder))})" if failure.holder else ""
        print(f"  attempt {failure.attempt} failed{by}: {error}")


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.tasks_command == "show":
            _show_task(client.get_task(args.task_id))
            return 0
        if args.tasks_command == "list":
            for task in client.list_tasks(args.workflow, args.stage, args.state):
                error = _safe(task.failures[-1].error) if task.failures else ""
                print(
                    f"{task.id:>8}  {_safe(task.stage):<16} {task.state:<10} attempt "
                    f"{task.attempt}/{task.max_attempts}  run {_safe(task.agent_run_id)}"
                    + (f"  last error: {error}" if error else "")
                )
            return 0
        if not args.stage and not args.task:
            print(
                "error: name a --stage or --task (the whole workflow is too much)", file=sys.stderr
            )
            return 2
        if args.tasks_command == "redrive":
            count = client.redrive_tasks(args.workflow, args.stage, args.task)
            print(f"{count} dead tasks redriven")
        else:
            count = client.cancel_tasks(args.workflow, args.stage, args.task)
            print(f"{count} tasks cancelled")
    return 0


SERVER_COMMANDS = {
    "serve": "run the ingestion and orchestrator services (agentrun serve --help)",
    "migrate": "apply the database's pending schema migrations, and exit",
}
"""The server's commands: the server package parses and runs them (`agentrun_server._cli`)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `agentrun` console script. `serve` and `migrate` are the server's
    own commands, handed to it whole (the SDK imports the server for nothing else)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVER_COMMANDS:
        from agentrun_server._cli import main as server_main

        return server_main(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers = {
        "upload": _upload,
        "workflow": _apply,
        "stats": _stats,
        "enqueue": _enqueue,
        "tasks": _tasks,
        "keys": run_keys_command,
        "tail": run_tail_command,
        "runs": run_runs_command,
        "collections": run_collections_command,
    }
    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # `agentrun ... | head`: the reader has all it wants
        # Python flushes stdout again at exit: point it at /dev/null so that raises nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe stopped
    except AgentRunError as exc:
        print(f"agentrun {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
