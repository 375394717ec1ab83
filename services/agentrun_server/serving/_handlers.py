"""Rebuilding a gRPC method handler around a wrapped behavior: what every interceptor here does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Wrap = Callable[[Callable[..., Any], bool, bool], Callable[..., Any]]
"""(behavior, client_streaming, server_streaming) -> the behavior to serve instead."""

# handler attribute, client streaming, server streaming, handler factory
_KINDS: tuple[tuple[str, bool, bool, Callable[..., grpc.RpcMethodHandler]], ...] = (
    ("unary_unary", False, False, grpc.unary_unary_rpc_method_handler),
    ("stream_unary", True, False, grpc.stream_unary_rpc_method_handler),
    ("unary_stream", False, True, grpc.unary_stream_rpc_method_handler),
    ("stream_stream", True, True, grpc.stream_stream_rpc_method_handler),
)


def rewrap(handler: grpc.RpcMethodHandler, wrap: Wrap) -> grpc.RpcMethodHandler:
    """`handler` with its behavior replaced by `wrap(behavior, client_streaming, server_streaming)`."""
    for attribute, client_streaming, server_streaming, factory in _KINDS:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return factory(
                wrap(behavior, client_streaming, server_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler
