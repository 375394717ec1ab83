"""What every importer shares: content-derived run ids and per-record error reporting."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from agentrun._agent_run import AgentRun
from agentrun._errors import FormatError

# Namespace of the content-derived run ids (uuid5).
RUN_ID_NAMESPACE = uuid.UUID("5b0c2f6e-4a52-4c1e-9a43-0d6f1a7e2b90")

OnInvalid = Callable[[FormatError], None]
"""Called with each record that cannot be read, which is then skipped."""


class RecordError(ValueError):
    """A record does not fit its format; `field` names the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field}: {message}")
        self.field = field


def content_id(record: Any) -> str:
    """A stable run id for a record that has none: uuid5 of its canonical JSON.

    Importing the same file twice gives the same ids, so a second upload stores nothing twice.
    """
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(RUN_ID_NAMESPACE, canonical))


def convert_records(
    path: str,
    records: Iterable[tuple[str, Any]],
    convert: Callable[[Any], AgentRun],
    on_invalid: OnInvalid | None,
) -> Iterator[AgentRun]:
    """Convert `(where, record)` pairs into runs.

    A record that is a `FormatError` (it could not even be parsed) or fails to convert raises
    `FormatError` naming the file, the record and the field; with `on_invalid`, it is passed there
    instead and skipped.
    """
    for where, record in records:
        try:
            if isinstance(record, FormatError):
                raise record
            try:
                run = convert(record)
            except Exception as exc:
                raise record_error(path, where, exc) from exc
        except FormatError as error:
            if on_invalid is None:
                raise
            on_invalid(error)
            continue
        yield run


def record_error(path: str, where: str, exc: Exception) -> FormatError:
    """A FormatError for one record, naming the field at fault where the cause tells it."""
    field: str | None = None
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(run)"
        more = f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""
        detail = f"field {field}: {first['msg']}{more}"
    elif isinstance(exc, RecordError):
        field, detail = exc.field, str(exc)
    elif isinstance(exc, KeyError):
        field = str(exc.args[0]) if exc.args else None
        detail = f"field {field}: required"
    elif isinstance(exc, TypeError | ValueError | AttributeError):
        detail = f"{type(exc).__name__}: {exc}"
    else:
        raise exc
    return FormatError(f"{path}: {where}: {detail}", path=path, record=where, field=field)
