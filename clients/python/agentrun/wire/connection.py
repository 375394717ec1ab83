"""How a client reaches a server, the same in every language: the default address, the URL
schemes and whether each means TLS, the environment variables a client reads, and the largest
message a client sends and receives. `scripts/gen_limits.py` writes them for the clients in other
languages (`make gen`); the Python SDK's `Connection` reads them from here.
"""

from __future__ import annotations

DEFAULT_PORT = 50051
"""The port `agentrun serve` listens on unless told otherwise."""
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
"""Where a client goes with no address given and none in ENV_SERVER."""
URL_SCHEMES = {"grpcs://": True, "https://": True, "grpc://": False, "http://": False}
"""The schemes a server URL may start with, and whether each means TLS (none: decided by the
rest of the configuration)."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest message a client sends or receives (gRPC's default receive limit is 4 MiB)."""

ENV_SERVER = "AGENTRUN_SERVER"
"""The server URL: `host:port`, a scheme above and `host:port`, or replicas `a:p,b:p`."""
ENV_API_KEY = "AGENTRUN_API_KEY"
"""The API key, sent as `authorization: Bearer <key>`."""
ENV_TLS = "AGENTRUN_TLS"
"""1 or 0: TLS on or off, whatever the URL says."""
ENV_TLS_CA = "AGENTRUN_TLS_CA"
"""A PEM CA bundle to verify the server with."""
ENV_TLS_CERT = "AGENTRUN_TLS_CERT"
"""A PEM client certificate, for mTLS."""
ENV_TLS_KEY = "AGENTRUN_TLS_KEY"
"""The PEM key of the client certificate."""
ENV_TLS_SERVER_NAME = "AGENTRUN_TLS_SERVER_NAME"
"""The name to verify the server's certificate against, when it differs from the address."""
