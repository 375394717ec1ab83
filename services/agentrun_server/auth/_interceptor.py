"""The interceptor that authenticates each call once, checks its scope against METHOD_SCOPES, and
makes the principal the call's `caller()` for the servicers' limit checks (`Access`).

A stream lives as long as its key: when the key is revoked (or expires) while a stream is open,
the stream's task is cancelled and the call ends UNAUTHENTICATED, whatever the stream was doing
(waiting for a message, pushing leases, watching a run). Refused calls are counted by reason
(`agentrun_auth_refused_total`) and logged at most once per `REFUSAL_LOG_SECONDS`, so a brute
force shows without flooding the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from agentrun_server._errors import PermissionDenied, Unauthenticated
from agentrun_server.auth._keys import KeyRing
from agentrun_server.auth._principal import (
    METHOD_SCOPES,
    OPEN_PREFIXES,
    Principal,
    set_caller,
)
from agentrun_server.serving._handlers import ServerInterceptor, rewrap, yields_responses

_log = logging.getLogger(__name__)

REFUSAL_LOG_SECONDS = 10.0
"""Refused calls are logged in one line per this many seconds at most, with their count."""
REFUSAL_REASONS = (
    "no_credentials",
    "unknown_key",
    "expired_key",
    "unknown_certificate",
    "scope",
    "unknown_method",
)


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


class Refusals:
    """Refused calls: counted by reason, logged in one line per REFUSAL_LOG_SECONDS at most."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.total = Counter(
            "agentrun_auth_refused_total",
            "Calls refused for their credentials (no key, unknown or revoked key, expired key, "
            "unknown client certificate) or their scope, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSAL_REASONS:
            self.total.labels(reason)
        self._since_logged = 0
        self._logged_at = 0.0

    def record(self, reason: str, peer: str, method: str, message: str) -> None:
        self.total.labels(reason).inc()
        self._since_logged += 1
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_SECONDS:
            return
        _log.warning(
            "refused %d call(s) for their credentials or scope since the last such line; the "
            "latest from %s, %s: %s",
            self._since_logged,
            peer,
            method,
            message,
        )
        self._since_logged = 0
        self._logged_at = now


class AuthInterceptor(ServerInterceptor):
    """Refuses calls without a live key (UNAUTHENTICATED) or outside its scopes, or to a method
    no scope is defined for (PERMISSION_DENIED: fail closed), raising the server's errors so the
    error table answers them: put it after the ErrorInterceptor."""

    def __init__(self, ring: KeyRing, registry: CollectorRegistry | None = None) -> None:
        self._ring = ring
        self._refusals = Refusals(registry)

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
        scopes = METHOD_SCOPES.get(method)
        ring, refusals = self._ring, self._refusals

        def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            try:
                principal = ring.authenticate(token, () if token else certificate_subjects(context))
                if scopes is None:
                    raise PermissionDenied(
                        f"{method}: no scope admits this method (the server's scope table lacks "
                        "it): refused to every key"
                    )
                principal.require(scopes, method)
            except (Unauthenticated, PermissionDenied) as refused:
                reason = getattr(refused, "reason", None) or (
                    "scope" if scopes is not None else "unknown_method"
                )
                refusals.record(reason, context.peer(), method, str(refused))
                raise
            set_caller(principal)
            return principal

        def wrap(behavior: Callable[..., Any], _: bool, streaming_response: bool) -> Any:
            if streaming_response and yields_responses(behavior):

                async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                    principal = admit(context)
                    with _Lifetime(principal) as lifetime:
                        try:
                            async for response in behavior(request, context):
                                yield response
                        except asyncio.CancelledError:
                            lifetime.reraise()
                            raise

                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                principal = admit(context)
                with _Lifetime(principal) as lifetime:
                    try:
                        return await behavior(request, context)
                    except asyncio.CancelledError:
                        lifetime.reraise()
                        raise

            return unary

        return rewrap(handler, wrap)


class _Lifetime:
    """Ends the call's task when its key is revoked (or expires) while the call runs: the
    cancellation is turned into UNAUTHENTICATED by `reraise()`."""

    def __init__(self, principal: Principal) -> None:
        self._principal = principal
        self._task = asyncio.current_task()
        self._revoked = False
        self._watch: Any = None

    def __enter__(self) -> _Lifetime:
        self._watch = self._principal.watch(self._on_revoke)
        self._watch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watch.__exit__(*exc)

    def _on_revoke(self) -> None:
        if not self._revoked and self._task is not None and not self._task.done():
            self._revoked = True
            self._task.cancel()

    def reraise(self) -> None:
        """Raise UNAUTHENTICATED if the cancellation came from a revocation (else return, and
        the cancellation goes on: the client went away)."""
        if self._revoked:
            if self._task is not None:
                self._task.uncancel()
            raise Unauthenticated(
                f"the API key {self._principal.name!r} was revoked or expired while this call "
                "was open"
            ) from None
