"""The one table mapping server errors to gRPC status codes, applied by an interceptor.

Handlers raise `agentrun_server._errors` exceptions; nothing else builds a status by hand. An
unexpected exception is logged with its traceback and answered INTERNAL. An error with
`retry_after_seconds` carries a google.rpc.RetryInfo detail in the `grpc-status-details-bin`
trailer, the standard place gRPC clients look for it (AIP-193).

A request that does not decode is INVALID_ARGUMENT: the interceptor decodes it, so that the
decoder's exception never reaches grpc (which answers it UNKNOWN and logs a traceback).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from agentrun_server._errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from agentrun_server.serving._handlers import ServerInterceptor, rewrap, yields_responses

_log = logging.getLogger(__name__)

STATUS_CODES: dict[type[ServerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: ServerError) -> grpc.StatusCode:
    """The status code of a server error (its most specific class in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


STATUS_DETAILS_KEY = "grpc-status-details-bin"


def retry_info_trailer(
    code: grpc.StatusCode, message: str, retry_after_seconds: float
) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying a google.rpc.Status with a RetryInfo detail."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(0, round(retry_after_seconds * 1000)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], error: Exception, method: str
) -> None:
    if isinstance(error, ServerError):
        code, message = status_for(error), str(error)
        if error.retry_after_seconds is None:
            await context.abort(code, message)
        await context.abort(
            code, message, retry_info_trailer(code, message, error.retry_after_seconds)
        )
    _log.error("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


class MalformedRequest(NamedTuple):
    """What a request that did not decode becomes: the handler answers INVALID_ARGUMENT."""

    message: str


class ThrottledLog:
    """Logs a kind of client error at WARNING at most once per `interval_seconds`, saying how many
    were not logged: a client sending garbage in a loop cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval_seconds: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval_seconds
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        more = f" ({skipped} more in the last {self._interval:g} s)" if skipped else ""
        self._logger.warning("%s%s", message, more)


_client_errors = ThrottledLog(_log)


def _decoding(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError; protobuf raises nothing narrower for bad input
            return MalformedRequest(f"malformed request: {exc}"[:300])

    return decode


def _refuse_malformed(method: str, request: MalformedRequest) -> InvalidArgument:
    _client_errors.warning(method, f"{method}: {request.message}")
    return InvalidArgument(request.message)


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is MalformedRequest:
            raise _refuse_malformed(method, request)
        yield request


def _wrap(
    behavior: Callable[..., Any], streaming_request: bool, streaming_response: bool, method: str
) -> Callable[..., Any]:
    if streaming_response and yields_responses(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                if streaming_request:
                    request = _checked(request, method)
                elif type(request) is MalformedRequest:
                    raise _refuse_malformed(method, request)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if streaming_request:
                request = _checked(request, method)
            elif type(request) is MalformedRequest:
                raise _refuse_malformed(method, request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return unary


class ErrorInterceptor(ServerInterceptor):
    """Turns server errors raised by any handler into their status (see STATUS_CODES)."""

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
        method = handler_call_details.method
        return rewrap(
            handler,
            lambda behavior, client_streaming, server_streaming: _wrap(
                behavior, client_streaming, server_streaming, method
            ),
            _decoding,
        )
