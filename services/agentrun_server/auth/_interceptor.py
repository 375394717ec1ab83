"""The interceptor that authenticates each call once, checks its scope against METHOD_SCOPES, and
makes the principal the call's `caller()` for the servicers' collection and workflow checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from agentrun_server.auth._keys import KeyRing
from agentrun_server.auth._principal import (
    METHOD_SCOPES,
    OPEN_PREFIXES,
    SCOPES,
    Principal,
    set_caller,
)
from agentrun_server.serving._handlers import ServerInterceptor, rewrap, yields_responses

_ANY_SCOPE = SCOPES  # reflection: any live key


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` header, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def certificate_subjects(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, ...]:
    """The verified client certificate's subject, whole and as "CN=<common name>" (mTLS)."""
    auth = context.auth_context()
    return (
        *(v.decode(errors="replace") for v in auth.get("x509_subject", ())),
        *(f"CN={v.decode(errors='replace')}" for v in auth.get("x509_common_name", ())),
    )


class AuthInterceptor(ServerInterceptor):
    """Refuses calls without a live key (UNAUTHENTICATED) or outside its scopes
    (PERMISSION_DENIED), raising the server's errors so the error table answers them: put it
    after the ErrorInterceptor."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        scopes = METHOD_SCOPES.get(method, _ANY_SCOPE)
        ring = self._ring

        def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            principal = ring.authenticate(token, () if token else certificate_subjects(context))
            principal.require(scopes, method)
            set_caller(principal)
            return principal

        def wrap(behavior: Callable[..., Any], _: bool, streaming_response: bool) -> Any:
            if streaming_response and yields_responses(behavior):

                async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                    admit(context)
                    async for response in behavior(request, context):
                        yield response

                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                admit(context)
                return await behavior(request, context)

            return unary

        return rewrap(handler, wrap)
