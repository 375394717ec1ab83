"""The limits a request must keep, the same for the SDK and the server: what the SDK accepts, the
server stores, and every stored value reads back. `scripts/gen_limits.py` writes them for the
clients in other languages (`make gen`).

Names (collections, run ids, transcript keys, workers) are 1 to MAX_NAME_BYTES bytes of UTF-8 of
printable characters; collection names are compared in Unicode NFC, so "café" is one name however
it was typed. Workflows, stages and pathways are identifiers: IDENTIFIER_PATTERN.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

MAX_NAME_BYTES = 256
"""Longest name, in UTF-8 bytes."""
MAX_IDENTIFIER_CHARS = 128
"""Longest workflow, stage or pathway name."""
IDENTIFIER_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""What a workflow, stage or pathway name is made of (they become metric labels and CLI words)."""
MAX_RUN_FILTERS = 8
"""Most filters of one run listing (`ListAgentRunsRequest.filters`)."""
MAX_FILTER_TEXT_CHARS = 256
"""Longest string a run filter compares with (longer metadata strings are not filtered on)."""
MAX_DESCRIPTION_BYTES = 64 * 1024
"""Longest collection description, in UTF-8 bytes."""
MAX_STAGES = 200
"""Most stages in one workflow."""
MAX_PATHWAYS = 64
"""Most pathways out of one stage."""
MAX_ATTEMPTS = 100
"""Most attempts a retry policy may allow."""
MAX_LEASE_SECONDS = 7 * 24 * 3600.0
"""Longest lease (a stage's, a subscription's or an extension's); extend a longer task."""
MAX_DELAY_SECONDS = 7 * 24 * 3600.0
"""Longest backoff or retry-after a task may wait before it is ready again."""
MAX_VALUE_DEPTH = 20
"""Deepest nesting of dicts and lists in a metadata value, tool-call arguments or a stage output.
Deeper values would approach protobuf's 100-level message limit once wrapped in their messages."""
MAX_OUTPUT_BYTES = 1024 * 1024
"""Largest encoded stage output."""
MAX_IDS_PER_REQUEST = 10_000
"""Most ids in one request's id list (task ids, run ids, resumed leases)."""


def printable(text: str) -> bool:
    """Whether `text` has no control, format (e.g. right-to-left overrides) or separator
    characters other than the space (`str.isprintable`)."""
    return text.isprintable()


def normalized_name(text: str) -> str:
    """`text` in Unicode NFC, the form names are stored and compared in."""
    return unicodedata.normalize("NFC", text)


def name_problem(text: str) -> str | None:
    """Why `text` cannot be a name, or None."""
    if not text:
        return "must not be empty"
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"{size:,} bytes, over the limit of {MAX_NAME_BYTES}"
    if not printable(text):
        bad = next(c for c in text if not c.isprintable())
        return f"character U+{ord(bad):04X} is not printable; names are printable text"
    return None


def identifier_problem(text: str) -> str | None:
    """Why `text` cannot be a workflow, stage or pathway name, or None."""
    if IDENTIFIER_PATTERN.fullmatch(text):
        return None
    if not text:
        return "must not be empty"
    if len(text) > MAX_IDENTIFIER_CHARS:
        return f"{len(text):,} characters, over the limit of {MAX_IDENTIFIER_CHARS}"
    return "only letters, digits, '.', '_' and '-' are allowed"


def value_depth_problem(value: Any) -> str | None:
    """Why a JSON-like value nests too deep, or None: dicts and lists count a level each."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict):
            children: Any = current.values()
        elif isinstance(current, list | tuple):
            children = current
        else:
            continue
        if depth + 1 > MAX_VALUE_DEPTH:
            return f"nested more than {MAX_VALUE_DEPTH} levels deep (dicts and lists)"
        stack.extend((child, depth + 1) for child in children)
    return None


def shown(value: object, limit: int = 64) -> str:
    """`repr(value)` cut to about `limit` characters, for error messages that echo input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"
