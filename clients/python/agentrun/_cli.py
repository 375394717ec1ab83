"""The `agentrun` command: serve, upload, workflow apply, stats.

`serve` is the one place the SDK reaches the server package, imported only when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from agentrun._cli_keys import add_keys_commands, run_keys_command
from agentrun._cli_tail import add_tail_command, run_tail_command
from agentrun._client import Client
from agentrun._connection import (
    SERVER_ENV,
    add_connection_arguments,
    connection_from_arguments,
)
from agentrun._convert import value_from_proto
from agentrun._errors import AgentRunError, FormatError
from agentrun._terminal import safe_text as _safe
from agentrun._workflow import load_workflow
from agentrun._writer import AgentRunWriter
from agentrun.importers import load_agent_runs
from agentrun.v1 import workflow_pb2

STATE_COLUMNS = ("ready", "scheduled", "leased", "done", "dead", "cancelled")
# What a task's state can be ("scheduled" above is a ready task waiting out its backoff).
TASK_STATES = tuple(
    value.name.removeprefix("TASK_STATE_").lower()
    for value in workflow_pb2.TaskState.DESCRIPTOR.values
    if value.number
)


def _env_default(name: str, fallback: str) -> str:
    return os.environ.get(name) or fallback


def _add_server(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser, os.environ.get(SERVER_ENV))


def _client(args: argparse.Namespace) -> Client:
    return Client(connection=connection_from_arguments(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentrun", description="Ingest LLM agent runs and take them through workflows."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the ingestion and orchestrator services")
    serve.add_argument(
        "--db",
        default=_env_default("AGENTRUN_DB", "sqlite:///agentrun.db"),
        help="database URL: sqlite:///PATH or postgresql://USER@HOST:PORT/DBNAME "
        "[env AGENTRUN_DB; default sqlite:///agentrun.db]",
    )
    serve.add_argument(
        "--host",
        default=_env_default("AGENTRUN_HOST", "127.0.0.1"),
        help="interface to bind gRPC to; another than loopback needs --auth keys (or "
        "--insecure) [env AGENTRUN_HOST; default 127.0.0.1]",
    )
    serve.add_argument(
        "--auth",
        choices=("keys", "none"),
        default=_env_default("AGENTRUN_AUTH", "none"),
        help="keys: every call needs an API key with the scope its RPC needs (make the first "
        "with `agentrun keys create admin --scope admin --db URL`); none: no credentials "
        "checked, for loopback [env AGENTRUN_AUTH; default none]",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="with --auth none, serve a non-loopback --host anyway: every client that reaches it "
        "can read every run and settle or cancel any task (warned at start, and "
        "agentrun_server_insecure 1)",
    )
    tls = serve.add_argument_group("TLS (certificates reload on change or SIGHUP)")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("AGENTRUN_TLS_CERT", ""),
        help="serve gRPC over TLS with this PEM certificate chain [env AGENTRUN_TLS_CERT]",
    )
    tls.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("AGENTRUN_TLS_KEY", ""),
        help="the certificate's PEM private key [env AGENTRUN_TLS_KEY]",
    )
    tls.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        default=os.environ.get("AGENTRUN_TLS_CLIENT_CA", ""),
        help="require client certificates signed by this PEM CA (mTLS); a certificate's "
        "subject is admitted by a key entry (keys create --certificate-subject) "
        "[env AGENTRUN_TLS_CLIENT_CA]",
    )
    serve.add_argument(
        "--metrics-host",
        default=_env_default("AGENTRUN_METRICS_HOST", "127.0.0.1"),
        help="interface to serve /metrics on [env AGENTRUN_METRICS_HOST; default 127.0.0.1]",
    )
    serve.add_argument(
        "--metrics-web-config",
        metavar="FILE",
        default=os.environ.get("AGENTRUN_METRICS_WEB_CONFIG", ""),
        help="TLS and basic auth for /metrics, in the format of Prometheus exporters' "
        "--web.config.file (tls_server_config, basic_auth_users) "
        "[env AGENTRUN_METRICS_WEB_CONFIG]",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(_env_default("AGENTRUN_PORT", "50051")),
        help="gRPC port, 0 for any free one [env AGENTRUN_PORT; default 50051]",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env_default("AGENTRUN_METRICS_PORT", "9464")),
        help="Prometheus /metrics port, 0 for any, -1 for none [env AGENTRUN_METRICS_PORT; default 9464]",
    )
    serve.add_argument(
        "--health-port",
        type=int,
        default=int(_env_default("AGENTRUN_HEALTH_PORT", "-1")),
        help="a second gRPC port serving only health checks, in plaintext: for load balancers "
        "without a client certificate under mTLS; -1 for none [env AGENTRUN_HEALTH_PORT; "
        "default -1]",
    )
    limits = serve.add_argument_group("ingestion limits")
    limits.add_argument(
        "--max-message-bytes",
        type=int,
        help="largest upload message after decompression; each stream reserves this much of "
        "--max-pending-bytes while it receives one [default 17 MiB]",
    )
    limits.add_argument(
        "--max-runs-per-message",
        type=int,
        help="most runs in one upload message [default 1000]",
    )
    limits.add_argument(
        "--max-run-bytes",
        type=int,
        help="largest encoded run; a larger one is rejected alone [default 16 MiB]",
    )
    limits.add_argument(
        "--max-pending-bytes",
        type=int,
        help="bytes of uploads in memory (being received or committed) before streams are "
        "told to retry later [default 128 MiB]",
    )
    limits.add_argument(
        "--max-pending-bytes-per-peer",
        type=int,
        help="the part of --max-pending-bytes one client host may hold [default 48 MiB]",
    )
    limits.add_argument(
        "--stream-idle-seconds",
        type=float,
        help="an upload stream that sends nothing this long is closed [default 30]",
    )
    limits.add_argument(
        "--live-run-timeout",
        dest="live_run_timeout_seconds",
        type=float,
        metavar="SECONDS",
        help="a live run with no event this long reads as abandoned until its next event "
        "[default 3600]",
    )
    limits.add_argument(
        "--max-live-run-bytes",
        type=int,
        help="most bytes of events one live run may take [default 268435456]",
    )
    limits.add_argument(
        "--max-upload-streams-per-peer",
        type=int,
        help="upload streams open at once from one client host [default 32]",
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="on SIGTERM, how long in-flight calls may finish [default 10]",
    )
    serve.add_argument(
        "--sqlite-synchronous",
        choices=("normal", "full"),
        default="normal",
        help="SQLite: 'normal' keeps every acknowledged write through a crash or kill of the "
        "server; 'full' also through power loss or an OS crash, at an fsync per write "
        "[default normal]",
    )
    database = serve.add_argument_group("PostgreSQL")
    database.add_argument(
        "--db-max-connections",
        type=int,
        default=10,
        help="connections the pool opens at most [default 10]",
    )
    database.add_argument(
        "--db-statement-timeout-seconds",
        type=float,
        default=30.0,
        help="a statement running longer is cancelled and its call answered UNAVAILABLE "
        "[default 30]",
    )
    serve.add_argument(
        "--resume-grace-seconds",
        type=float,
        default=15.0,
        help="how long a lease whose stream ended (or whose server died) waits for its worker "
        "to resume it before the task is retried [default 15]",
    )
    serve.add_argument(
        "--only",
        choices=("ingestion", "orchestrator"),
        help="serve one of the pair (run the other as its own process on the same --db)",
    )

    migrate = commands.add_parser(
        "migrate",
        help="apply the database's pending schema migrations, and exit",
        description="Apply pending schema migrations (serve does too, at start). Replicas that "
        "start together never race: PostgreSQL migrations run under an advisory lock.",
    )
    migrate.add_argument(
        "--db",
        default=_env_default("AGENTRUN_DB", "sqlite:///agentrun.db"),
        help="database URL [env AGENTRUN_DB; default sqlite:///agentrun.db]",
    )

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
    _add_server(upload)

    workflow = commands.add_parser("workflow", help="manage workflows")
    workflow_commands = workflow.add_subparsers(
        dest="workflow_command", required=True, metavar="COMMAND"
    )
    apply = workflow_commands.add_parser(
        "apply", help="create or update a workflow from a YAML/JSON file"
    )
    apply.add_argument("file")
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
    add_keys_commands(commands, _add_server)
    return parser


LIMIT_FLAGS = (
    "max_message_bytes",
    "max_runs_per_message",
    "max_run_bytes",
    "max_pending_bytes",
    "max_pending_bytes_per_peer",
    "stream_idle_seconds",
    "max_upload_streams_per_peer",
    "live_run_timeout_seconds",
    "max_live_run_bytes",
)


def _migrate(args: argparse.Namespace) -> int:
    from agentrun_server import ServerError
    from agentrun_server.storage import open_storage

    async def main() -> None:
        storage = await open_storage(args.db)
        await storage.close()

    try:
        asyncio.run(main())
    except ServerError as exc:
        print(f"agentrun migrate: {exc}", file=sys.stderr)
        return 1
    print(f"agentrun migrate: {args.db} is at the latest schema")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from agentrun_server import (
        SERVICES,
        IngestionLimits,
        Server,
        ServerConfig,
        ServerError,
        TlsConfig,
    )
    from agentrun_server.storage import PoolConfig, SqliteConfig

    config = ServerConfig(
        db=args.db,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        metrics_web_config=args.metrics_web_config,
        auth=args.auth,
        tls=TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca),
        insecure=args.insecure,
        services=(args.only,) if args.only else SERVICES,
        grace_seconds=args.grace_seconds,
        resume_grace_seconds=args.resume_grace_seconds,
        pool=PoolConfig(args.db_max_connections, args.db_statement_timeout_seconds),
        sqlite=SqliteConfig(args.sqlite_synchronous),
        limits=IngestionLimits(
            **{
                name: getattr(args, name)
                for name in LIMIT_FLAGS
                if getattr(args, name) is not None  # unset: the server's default
            }
        ),
    )
    server = Server(config)

    async def main() -> None:
        ready = asyncio.Event()
        serving = asyncio.create_task(server.serve(ready))
        await asyncio.wait(
            {serving, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if ready.is_set():
            metrics = (
                f"metrics on {server.metrics_url}" if config.metrics_port >= 0 else "no metrics"
            )
            print(
                f"agentrun serving {' and '.join(config.services)} on {config.host}:{server.port}"
                f" ({metrics}; auth {config.auth}{', TLS' if server.tls else ''}; db {config.db})",
                flush=True,
            )
        await serving

    try:
        asyncio.run(main())
    except ServerError as exc:  # bad configuration, an unreachable database: one line
        print(f"agentrun serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _upload(args: argparse.Namespace) -> int:
    skipped: list[FormatError] = []
    on_invalid = skipped.append if args.skip_invalid else None
    runs = [run for path in args.paths for run in load_agent_runs(path, on_invalid=on_invalid)]
    for error in skipped:
        print(f"agentrun upload: skipped {error}", file=sys.stderr)
    with _client(args) as client:
        collection = client.create_collection(args.collection, workflow=args.workflow).collection
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


def _apply(args: argparse.Namespace) -> int:
    spec = load_workflow(args.file)
    with _client(args) as client:
        response = client.apply_workflow(spec.to_proto())
    w = response.workflow
    state = "applied" if response.changed else "unchanged"
    print(
        f"workflow {w.name!r} {state} (version {w.version}): "
        + " -> ".join(s.name for s in w.stages)
    )
    return 0


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
        age = s.oldest_ready_age.ToNanoseconds() / 1e9
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


def _show_task(task: workflow_pb2.Task) -> None:
    state = workflow_pb2.TaskState.Name(task.state).removeprefix("TASK_STATE_").lower()
    print(f"task {task.id}: {_safe(task.workflow)}/{_safe(task.stage)}, {state}")
    print(f"  run          {_safe(task.agent_run_id)} (collection {_safe(task.collection_id)})")
    print(f"  attempt      {task.attempt} of {task.max_attempts}; priority {task.priority}")
    if task.state == workflow_pb2.TASK_STATE_DONE:
        print(f"  pathway      {_safe(task.pathway) or '(end)'}")
    if task.previous_task_id:
        print(f"  after task   {task.previous_task_id}")
    for label, present, value in (
        ("input", task.HasField("input"), task.input),
        ("output", task.HasField("output"), task.output),
    ):
        if present:
            text = json.dumps(value_from_proto(value), indent=2, default=str)
            print(f"  {label:<12} " + text.replace("\n", "\n" + " " * 15))
    for failure in task.failures:
        error = _safe(failure.error, keep_newlines=True).replace("\n", "\n" + " " * 4)
        print(f"  attempt {failure.attempt} failed: {error}")


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.tasks_command == "show":
            _show_task(client.get_task(args.task_id))
            return 0
        if args.tasks_command == "list":
            state = args.state and workflow_pb2.TaskState.Value(f"TASK_STATE_{args.state.upper()}")
            for task in client.list_tasks(args.workflow, args.stage, state or 0):
                name = workflow_pb2.TaskState.Name(task.state).removeprefix("TASK_STATE_")
                error = _safe(task.failures[-1].error) if task.failures else ""
                print(
                    f"{task.id:>8}  {_safe(task.stage):<16} {name.lower():<10} attempt "
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `agentrun` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.command != "serve" else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers = {
        "serve": _serve,
        "migrate": _migrate,
        "upload": _upload,
        "workflow": _apply,
        "stats": _stats,
        "enqueue": _enqueue,
        "tasks": _tasks,
        "keys": run_keys_command,
        "tail": run_tail_command,
    }
    try:
        return handlers[args.command](args)
    except AgentRunError as exc:
        print(f"agentrun {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
