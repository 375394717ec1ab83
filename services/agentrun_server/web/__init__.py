"""The web console: read runs as they happen and operate the task queue in a browser.

Served by the server process on `--web-host`/`--web-port` (Starlette on uvicorn, Jinja2 pages,
htmx for partial updates and server-sent events). It reads and acts only through the server's own
gRPC services, as the signed-in key (`_calls`), so it obeys every rule a client does."""

from __future__ import annotations

from agentrun_server.web._console import WebConsole

__all__ = ["WebConsole"]
