"""The console's lifecycle in the server process: `start()` binds its port and serves it with
uvicorn on the server's event loop; `shutdown()` ends the live pages' event streams, then stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from agentrun_server._errors import InvalidArgument
from agentrun_server.auth import KeyRing
from agentrun_server.web._app import ConsoleApp
from agentrun_server.web._calls import Calls


class _Uvicorn(uvicorn.Server):
    # The server process owns SIGTERM and SIGINT (its graceful shutdown stops the console).
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebConsole:
    """The web console on `host:port`, reaching the server's services at `target`."""

    def __init__(
        self, target: str, keys: KeyRing | None, services: tuple[str, ...], grace_seconds: float
    ) -> None:
        self._calls = Calls(target)
        self.app = ConsoleApp(self._calls, keys, services)
        self._grace_seconds = grace_seconds
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.url = ""

    async def start(self, host: str, port: int) -> None:
        """Bind and serve.

        Raises:
            InvalidArgument: the port is in use or not this machine's.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            sock.close()
            raise InvalidArgument(
                f"--web-port: cannot serve the console on {host}:{port}: {exc.strerror or exc}; "
                "pick another, 0 for any free one, or -1 for none"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/"
        # uvicorn's lines of its own start and stop say nothing the server does not.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        config = uvicorn.Config(
            self.app.asgi,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, int(self._grace_seconds)),
        )
        self._server = server = _Uvicorn(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="web-console")
        while not server.started:
            if self._task.done():
                self._task.result()
                raise InvalidArgument(f"--web-port: the console did not start on {host}:{port}")
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        """End the live pages' streams, stop serving, close the channel. Idempotent."""
        self.app.stopping.set()
        server, self._server = self._server, None
        task, self._task = self._task, None
        if server is not None and task is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
        await self._calls.close()
