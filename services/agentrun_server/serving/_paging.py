"""Paging of list RPCs: a page token is the last key returned, as a decimal string."""

from __future__ import annotations

from agentrun.wire.limits import shown
from agentrun_server._checks import parse_id
from agentrun_server._errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_after(token: str) -> int:
    """The key a page starts after (0 for the first page).

    Raises:
        InvalidArgument: the token did not come from this API.
    """
    if not token:
        return 0
    after = parse_id(token)
    if after is None:
        raise InvalidArgument(f"page_token: {shown(token)} is not a page token from this API")
    return after


def page_size(requested: int) -> int:
    """The page size to use: 0 means the default; larger than the maximum is capped."""
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
