"""Authentication and authorization: API keys in the database, scopes per RPC, collection and
workflow limits, TLS and mTLS, and audit lines for admin actions.

A server with `--auth keys` runs every call through `AuthInterceptor`: the key (or client
certificate) is resolved once per call or stream from the `KeyRing`, its scope checked against
`METHOD_SCOPES`; servicers then check collections and workflows against `caller()`.
"""

from __future__ import annotations

from agentrun_server.auth._access import Access
from agentrun_server.auth._audit import audit, audit_log
from agentrun_server.auth._database import (
    create_key_on_database,
    list_keys_on_database,
    revoke_key_on_database,
)
from agentrun_server.auth._interceptor import AuthInterceptor, bearer_token
from agentrun_server.auth._keys import KeyRing, hash_token, new_token
from agentrun_server.auth._principal import (
    ANYONE,
    METHOD_SCOPES,
    SCOPES,
    Principal,
    caller,
)
from agentrun_server.auth._servicer import KeyServicer, audit_created, key_to_proto, new_key
from agentrun_server.auth._tls import ServerTls

__all__ = [
    "ANYONE",
    "METHOD_SCOPES",
    "SCOPES",
    "Access",
    "AuthInterceptor",
    "KeyRing",
    "KeyServicer",
    "Principal",
    "ServerTls",
    "audit",
    "audit_created",
    "audit_log",
    "bearer_token",
    "caller",
    "create_key_on_database",
    "hash_token",
    "key_to_proto",
    "list_keys_on_database",
    "new_key",
    "new_token",
    "revoke_key_on_database",
]
