"""Standard gRPC server metrics for grpc.aio, with go-grpc-prometheus's names and labels.

Dashboards built for go-grpc-prometheus (and grpc-ecosystem/py-grpc-prometheus) work unchanged:

    grpc_server_started_total{grpc_type, grpc_service, grpc_method}
    grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}
    grpc_server_msg_received_total{grpc_type, grpc_service, grpc_method}
    grpc_server_msg_sent_total{grpc_type, grpc_service, grpc_method}
    grpc_server_handling_seconds{grpc_type, grpc_service, grpc_method}   (histogram)

`grpc_type` is unary, client_stream, server_stream or bidi_stream; `grpc_code` is Go's spelling of
the status code ("OK", "InvalidArgument", "Canceled"). Streams are counted message by message, and
a stream's handling time runs from its start to its status. As go-grpc-prometheus's `Register`
does, every method of the served services starts at zero, so `rate()` has a series to work on
before the first call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from agentrun_server.serving._handlers import ServerInterceptor, rewrap, yields_responses

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# prometheus.DefBuckets, go-grpc-prometheus's default for grpc_server_handling_seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def go_code(code: grpc.StatusCode) -> str:
    """Go's `codes.Code.String()`: OK, Canceled, InvalidArgument, DeadlineExceeded..."""
    if code is grpc.StatusCode.OK:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(word.capitalize() for word in code.name.split("_"))


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The grpc_type label of a method."""
    if client_streaming:
        return "bidi_stream" if server_streaming else "client_stream"
    return "server_stream" if server_streaming else "unary"


class GrpcServerMetrics:
    """The five go-grpc-prometheus server metrics, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server.",
            _LABELS,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server.",
            _LABELS,
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            _LABELS,
            buckets=_BUCKETS,
            registry=registry,
        )

    def preregister(self, services: Iterable[ServiceDescriptor]) -> None:
        """Start every method's series at zero (all codes for `handled`), as go-grpc-prometheus."""
        for service in services:
            for method in service.methods:
                labels = (
                    grpc_type(method.client_streaming, method.server_streaming),
                    service.full_name,
                    method.name,
                )
                self.started.labels(*labels)
                self.received.labels(*labels)
                self.sent.labels(*labels)
                self.seconds.labels(*labels)
                for code in grpc.StatusCode:
                    self.handled.labels(*labels, go_code(code))


class MetricsInterceptor(ServerInterceptor):
    """Counts every call of a grpc.aio server into `GrpcServerMetrics`.

    Put it first in the server's interceptors, so it sees the status other interceptors settle on.
    """

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics
        self._calls: dict[str, _Call] = {}  # by full method name: label lookups done once

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        call = self._calls.get(handler_call_details.method)
        if call is None:
            service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
            kind = grpc_type(handler.request_streaming, handler.response_streaming)
            call = _Call(self._metrics, (kind, service, method))
            self._calls[handler_call_details.method] = call
        return rewrap(handler, call.wrap)


class _Call:
    """The metrics of one method; `wrap` gives its behavior counted."""

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = metrics.started.labels(*labels)
        self.received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self.seconds = metrics.seconds.labels(*labels)
        self.handled = metrics.handled

    def wrap(
        self, behavior: Callable[..., Any], client_streaming: bool, server_streaming: bool
    ) -> Callable[..., Any]:
        if server_streaming and yields_responses(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                begun = self._begin(client_streaming)
                request = self._count_requests(request) if client_streaming else request
                failure: BaseException | None = None
                try:
                    async for response in behavior(request, context):
                        self.sent.inc()
                        yield response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    self._end(begun, context, failure)

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            begun = self._begin(client_streaming)
            request = self._count_requests(request) if client_streaming else request
            failure: BaseException | None = None
            try:
                response = await behavior(request, context)
                if not server_streaming:  # else written with context.write(), not counted
                    self.sent.inc()
                return response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(begun, context, failure)

        return unary

    def _begin(self, client_streaming: bool) -> float:
        self.started.inc()
        if not client_streaming:
            self.received.inc()
        return time.perf_counter()

    async def _count_requests(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            self.received.inc()
            yield request

    def _end(
        self,
        begun: float,
        context: grpc.aio.ServicerContext[Any, Any],
        failure: BaseException | None,
    ) -> None:
        code = _final_code(context, failure)
        self.handled.labels(*self.labels, go_code(code)).inc()
        self.seconds.observe(time.perf_counter() - begun)


def _final_code(
    context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None
) -> grpc.StatusCode:
    if isinstance(failure, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if failure is not None and not isinstance(failure, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN  # what grpc.aio answers for an unhandled exception
    return grpc.StatusCode.OK
