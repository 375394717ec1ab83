"""The server's commands: `serve` and `migrate`.

    python -m agentrun_server serve --db sqlite:///agentrun.db
    agentrun serve ...          # the SDK's CLI hands `serve` and `migrate` over to this

Every flag of `serve` is a field of `ServerConfig`, made by `_config.settings()` with its
environment variable; nothing here names one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence

from agentrun_server._config import ServerConfig, add_arguments, config_from
from agentrun_server._errors import ServerError
from agentrun_server._server import Server

COMMANDS = ("serve", "migrate")


def parser(prog: str = "agentrun") -> argparse.ArgumentParser:
    """The parser of the server's commands."""
    top = argparse.ArgumentParser(prog=prog, description="Run the agentrun services.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the ingestion and orchestrator services",
        description="Run the ingestion and orchestrator services until SIGTERM or SIGINT. "
        "Every option also reads its AGENTRUN_* variable.",
    )
    add_arguments(serve)
    migrate = commands.add_parser(
        "migrate", help="apply the schema migrations to a database, then exit"
    )
    migrate.add_argument(
        "--db",
        help="database URL, as for serve [env AGENTRUN_DB; default sqlite:///agentrun.db]",
    )
    migrate.add_argument(
        "--vacuum",
        action="store_true",
        help="SQLite: also rewrite the file compactly, and switch it to incremental vacuum so "
        "that deleted runs give their space back (stop the servers first; needs as much free "
        "disk as the file takes). PostgreSQL's autovacuum needs nothing",
    )
    return top


def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT; 1 (said in one line) for a configuration that cannot
    serve or a database out of reach."""
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
            if server.web_url:
                print(f"agentrun console on {server.web_url}", flush=True)
            # This process is the server's: what it holds once serving (modules, schemas,
            # servicers) stays out of the collector's full passes, which walked it all with the
            # event loop stopped (39 ms, measured, under five Runners' load).
            gc.collect()
            gc.freeze()
        await serving

    try:
        asyncio.run(main())
    except ServerError as exc:  # bad configuration, an unreachable database: one line
        print(f"agentrun serve: {exc}", file=sys.stderr)
        return 1
    return 0


def migrate(db: str, vacuum: bool = False) -> int:
    """Apply pending migrations to the database (as `serve` does at start), then exit; with
    `vacuum`, rewrite a SQLite file compactly in incremental vacuum mode."""
    from agentrun_server.storage import SqliteStorage, open_storage

    async def main() -> None:
        storage = await open_storage(db)
        try:
            if vacuum and isinstance(storage, SqliteStorage):
                shrunk = await storage.vacuum()
                print(
                    f"agentrun migrate: {db} vacuumed ({shrunk / 2**20:.1f} MB given back); "
                    "deleted runs give their space back from now on"
                )
            elif vacuum:
                print(
                    "agentrun migrate: PostgreSQL's autovacuum makes deleted rows' space "
                    "reusable on its own; nothing to do"
                )
        finally:
            await storage.close()

    try:
        asyncio.run(main())
    except ServerError as exc:
        print(f"agentrun migrate: {exc}", file=sys.stderr)
        return 1
    print(f"agentrun migrate: {db} is at the latest schema")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "agentrun") -> int:
    """Run one of COMMANDS with its arguments."""
    args = parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from(args if args.command == "serve" else None)
    except ServerError as exc:  # a variable that does not parse
        print(f"agentrun {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        return migrate(args.db or config.db, args.vacuum)
    return serve(config)
