"""File steps both spools take (runs in `agentrun._spool`, events in `agentrun._event_spool`)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a file created or renamed in it) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: Path) -> Path:
    """Rename a damaged file to `*.bad`, kept for inspection; where it is now (its own name if
    the rename failed)."""
    bad = path.with_suffix(".bad")
    try:
        path.rename(bad)
    except OSError:
        return path
    return bad
