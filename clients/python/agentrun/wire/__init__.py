"""The wire contract beside the generated code (`agentrun.v1`): what every party to the protocol
applies, the SDK and the server alike, importable without the SDK (no pydantic, tiktoken, rich,
nor the SDK's metrics).

- `limits`: the sizes, counts, durations and name rules a request must keep
  (`scripts/gen_limits.py` writes them for the clients in other languages).
- `checks`: the checks a wire-form run (or a live run's event) must pass (`check_agent_run`).
- `codes`: the status codes answers carry per item (`Code`).
- `connection`: how a client reaches a server (default address, URL schemes, environment
  variables, message size).
- `filters`: run filters as people write them (`scores.reward < 1`), into `RunFilter`s.
- `framing`: messages framed by hand from encoded parts (uploads, live run events) and the
  varint.
"""

from __future__ import annotations

from agentrun.wire import checks, codes, connection, filters, framing, limits
from agentrun.wire.checks import InvalidRun, check_agent_run, encodes_shallow, parse_agent_run
from agentrun.wire.codes import Code, code_name
from agentrun.wire.framing import (
    RawUpload,
    decode_upload_request,
    encode_events_request,
    encode_upload_request,
)

__all__ = [
    "Code",
    "InvalidRun",
    "RawUpload",
    "check_agent_run",
    "checks",
    "code_name",
    "codes",
    "connection",
    "decode_upload_request",
    "encode_events_request",
    "encode_upload_request",
    "encodes_shallow",
    "filters",
    "framing",
    "limits",
    "parse_agent_run",
]
