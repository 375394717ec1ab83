"""Rebuilding a gRPC method handler around a wrapped behavior: what every interceptor here does."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

Wrap = Callable[[Callable[..., Any], bool, bool], Callable[..., Any]]
"""(behavior, client_streaming, server_streaming) -> the behavior to serve instead."""

if TYPE_CHECKING:  # grpc-stubs make it generic; grpcio's class is not subscriptable
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    ServerInterceptor = grpc.aio.ServerInterceptor

# handler attribute, client streaming, server streaming, handler factory
_KINDS: tuple[tuple[str, bool, bool, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...] = (
    ("unary_unary", False, False, grpc.unary_unary_rpc_method_handler),
    ("stream_unary", True, False, grpc.stream_unary_rpc_method_handler),
    ("unary_stream", False, True, grpc.unary_stream_rpc_method_handler),
    ("stream_stream", True, True, grpc.stream_stream_rpc_method_handler),
)


def yields_responses(behavior: Callable[..., Any]) -> bool:
    """Whether a streaming-response behavior yields its responses (an async generator) rather
    than writing them with `context.write()` from a coroutine, as grpc's own Health.Watch does. A
    wrapper must keep the style of what it wraps."""
    return inspect.isasyncgenfunction(behavior)


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap: Wrap,
    wrap_deserializer: Callable[[Callable[[bytes], Any]], Callable[[bytes], Any]] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with its behavior replaced by `wrap(behavior, client_streaming, server_streaming)`
    and, with `wrap_deserializer`, its request decoding by `wrap_deserializer(decoding)`."""
    deserializer = handler.request_deserializer
    if wrap_deserializer is not None and deserializer is not None:
        deserializer = wrap_deserializer(deserializer)
    for attribute, client_streaming, server_streaming, factory in _KINDS:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return factory(
                wrap(behavior, client_streaming, server_streaming),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    request_deserializers: Mapping[str, Callable[[bytes], Any]] | None = None,
    response_serializers: Mapping[str, Callable[[Any], bytes]] | None = None,
) -> None:
    """Serve `service` from `servicer`'s methods, as the generated `add_*_to_server` does, except
    that `request_deserializers` may replace the decoding of some methods' requests, and
    `response_serializers` the encoding of their responses (by method name)."""
    overrides = request_deserializers or {}
    encoders = response_serializers or {}
    handlers = {}
    for method in service.methods:
        factory = next(
            factory
            for _, client_streaming, server_streaming, factory in _KINDS
            if (client_streaming, server_streaming)
            == (method.client_streaming, method.server_streaming)
        )
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=overrides.get(
                method.name, GetMessageClass(method.input_type).FromString
            ),
            response_serializer=encoders.get(
                method.name, GetMessageClass(method.output_type).SerializeToString
            ),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(  # type: ignore[attr-defined]  # grpcio 1.62+, not stubbed
        service.full_name, handlers
    )
