"""A run's facets: its scores and top-level scalar metadata fields, as listings filter them
(`ListAgentRunsRequest.filters`), written beside the run when it is stored; and the backfill
that gives runs stored before facets existed theirs, in the background.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.wire.limits import MAX_FILTER_TEXT_CHARS, MAX_NAME_BYTES, MAX_RUN_FILTERS
from agentrun_server._errors import InvalidArgument
from agentrun_server.serving import cancel_and_wait
from agentrun_server.storage import Facet, RunFilter, Storage

_log = logging.getLogger(__name__)

BACKFILL_BATCH = 1_000
"""Runs read per backfill transaction."""


def facets_of_run(run: run_pb.AgentRun) -> tuple[Facet, ...]:
    """`scores.NAME` (a number, a bool as 0 or 1) and `metadata.FIELD` for each top-level
    metadata field holding a number, a bool or a short string."""
    facets = []
    for name, score in run.scores.items():
        kind = score.WhichOneof("kind")
        if kind is not None and _fits(name):
            number = float(getattr(score, kind))
            if not math.isnan(number):
                facets.append(Facet(f"scores.{name}", number, None))
    for key, field in run.metadata.fields.items():
        value = field.value
        held = value.WhichOneof("kind")
        if not _fits(key):
            continue
        if held in ("int_value", "double_value", "bool_value"):
            number = float(getattr(value, held))
            if not math.isnan(number):
                facets.append(Facet(f"metadata.{key}", number, None))
        elif held == "string_value":
            text = value.string_value
            if len(text) <= MAX_FILTER_TEXT_CHARS and "\x00" not in text:
                facets.append(Facet(f"metadata.{key}", None, text))
    return tuple(facets)


def _fits(name: str) -> bool:
    """A name a filter can name (PostgreSQL text holds no NUL)."""
    return len(name.encode()) <= MAX_NAME_BYTES and "\x00" not in name


_OPS = {
    pb.FILTER_OP_EQ: "=",
    pb.FILTER_OP_NE: "!=",
    pb.FILTER_OP_LT: "<",
    pb.FILTER_OP_LE: "<=",
    pb.FILTER_OP_GT: ">",
    pb.FILTER_OP_GE: ">=",
}


def checked_filters(filters: Sequence[pb.RunFilter]) -> tuple[RunFilter, ...]:
    """The storage form of a listing's filters.

    Raises:
        InvalidArgument: naming the filter and what is wrong (too many, a field that is not
            `scores.NAME` or `metadata.FIELD`, no op or value, a string compared by order).
    """
    if len(filters) > MAX_RUN_FILTERS:
        raise InvalidArgument(f"filters: {len(filters)} filters, over {MAX_RUN_FILTERS}")
    checked = []
    for i, given in enumerate(filters):
        where = f"filters[{i}]"
        prefix, _, name = given.field.partition(".")
        if prefix not in ("scores", "metadata") or not name or not _fits(name):
            raise InvalidArgument(
                f"{where}.field: {given.field[:100]!r}: must be scores.NAME or metadata.FIELD"
            )
        op = _OPS.get(given.op)
        if op is None:
            raise InvalidArgument(f"{where}.op: required (EQ, NE, LT, LE, GT or GE)")
        kind = given.WhichOneof("value")
        if kind is None:
            raise InvalidArgument(f"{where}.value: required (number, text or flag)")
        if kind == "text":
            if op not in ("=", "!="):
                raise InvalidArgument(f"{where}.op: a string compares by EQ or NE only")
            if len(given.text) > MAX_FILTER_TEXT_CHARS or "\x00" in given.text:
                raise InvalidArgument(
                    f"{where}.text: over {MAX_FILTER_TEXT_CHARS} characters, or holds NUL"
                )
            checked.append(RunFilter(given.field, op, None, given.text))
            continue
        number = float(given.flag) if kind == "flag" else given.number
        if math.isnan(number):
            raise InvalidArgument(f"{where}.number: NaN matches nothing")
        checked.append(RunFilter(given.field, op, number, None))
    return tuple(checked)


def facets_of(data: bytes) -> tuple[Facet, ...]:
    """The facets of an encoded run (as stored)."""
    return facets_of_run(run_pb.AgentRun.FromString(data))


class FacetBackfill:
    """A task on the server's event loop that indexes the runs a migration found without facets,
    a batch at a time, then ends: `start()`, then `stop()` at shutdown. Every replica may run it;
    a batch done twice is harmless (facets are kept once)."""

    def __init__(self, storage: Storage, pause_seconds: float = 0.05) -> None:
        self._storage = storage
        self._pause = pause_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="agentrun-facet-backfill")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        total = 0
        while True:
            try:
                done = await self._storage.backfill_facets(facets_of, BACKFILL_BATCH)
            except Exception:  # the database out of reach: try again later
                _log.warning("indexing the facets of older runs failed", exc_info=True)
                await asyncio.sleep(30)
                continue
            if done == 0:
                break
            total += done
            await asyncio.sleep(self._pause)  # leave the database to the clients between batches
        if total:
            _log.info("facets of %d runs stored before facets existed are indexed", total)
