"""Fake servers for client tests: real gRPC servers on real ports (port 0) whose methods are the
test's own handlers, for failures a real server cannot be made to produce on cue."""

from __future__ import annotations

import grpc
import grpc.aio


async def serve_fake(
    service: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> tuple[grpc.aio.Server, int]:
    """Start a server answering `service`'s methods (by name) with `handlers`; the server and
    its port. Stop it with `await server.stop(0)`."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port
