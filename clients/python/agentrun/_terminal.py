"""Printing what the server stored to a terminal, safely."""

from __future__ import annotations


def safe_text(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every unprintable character escaped (`\\x1b`, `\\u202e`), so that printing a
    stored name, id or error never sends escape sequences or right-to-left overrides to the
    terminal."""
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable() or (keep_newlines and c == "\n")
        else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
