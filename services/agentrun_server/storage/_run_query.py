"""The SQL of a run listing (`RunQuery`), written once for both engines: a collection's runs in
a state, meeting every filter on their facets, oldest or newest first, a page after a cursor.

An equality filter drives the query from a facet index (SQLite's `run_facets_by_value`,
PostgreSQL's `run_facets_by_text` or `_by_num`), ordered by run within one key and value, so a
page costs its own rows however many runs the collection holds; without one, the collection's
runs are read in order and each filter is one primary-key probe per run, which stays flat while
matches are not rare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentrun_server.storage._statements import RUN_COLUMNS
from agentrun_server.storage._types import RunFilter, RunQuery

_OPS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _column(condition: RunFilter) -> tuple[str, Any]:
    return ("num", condition.num) if condition.num is not None else ("text", condition.text)


_OTHER = {"num": "text", "text": "num"}
"""The column a facet holding a value in one leaves NULL (a facet is a number or a text)."""


LISTED_RUN_COLUMNS = ", ".join(f"r.{c}" for c in RUN_COLUMNS.split(", "))
"""`RUN_COLUMNS` of the `agent_runs r` these queries read."""


def _state(query: RunQuery, param: Callable[[Any], str]) -> str:
    """The condition that keeps runs in the query's state: a running run with no event since
    `abandoned_before` is abandoned (a later event reopens it, so the state is decided when read,
    not stored)."""
    if query.state is None:
        return ""
    if query.state == "finished":
        return " AND r.state = 'finished'"
    if query.state == "running":
        return f" AND r.state = 'running' AND r.updated_at >= {param(query.abandoned_before)}"
    return f" AND r.state = 'running' AND r.updated_at < {param(query.abandoned_before)}"


def runs_sql(
    query: RunQuery,
    columns: str,
    after_seq: int,
    last_seq: int | None,
    limit: int | None,
    param: Callable[[Any], str],
) -> str:
    """A SELECT of `columns` (of `agent_runs r`) for `query`: the runs after `after_seq` (0: from
    the start) in the listing's order, through `last_seq` if given, at most `limit`. `param`
    takes each value, in order, and returns its placeholder."""
    newest = query.newest_first
    driver = next((f for f in query.filters if f.op == "="), None)
    conditions = []
    if driver is not None:
        column, value = _column(driver)
        source = "run_facets d JOIN agent_runs r ON r.seq = d.run_seq"
        seq = "d.run_seq"
        conditions += [
            f"d.collection_id = {param(query.collection_id)}",
            f"d.key = {param(driver.key)}",
            f"d.{column} = {param(value)}",
            # Always true, and what lets SQLite's one index (..., num, text, run_seq) give the
            # matches in run order: an equality on each column before run_seq.
            f"d.{_OTHER[column]} IS NULL",
        ]
    else:
        source, seq = "agent_runs r", "r.seq"
        conditions.append(f"r.collection_id = {param(query.collection_id)}")
    if after_seq:
        conditions.append(f"{seq} {'<' if newest else '>'} {param(after_seq)}")
    if last_seq is not None:
        conditions.append(f"{seq} {'>=' if newest else '<='} {param(last_seq)}")
    for i, condition in enumerate(f for f in query.filters if f is not driver):
        column, value = _column(condition)
        conditions.append(
            f"EXISTS (SELECT 1 FROM run_facets f{i} WHERE f{i}.run_seq = r.seq "
            f"AND f{i}.key = {param(condition.key)} "
            f"AND f{i}.{column} {_OPS[condition.op]} {param(value)})"
        )
    order = f"{seq} DESC" if newest else seq
    state = _state(query, param)
    sql = f"SELECT {columns} FROM {source} WHERE {' AND '.join(conditions)}{state}"
    sql += f" ORDER BY {order}"
    if limit is not None:
        sql += f" LIMIT {param(limit)}"
    return sql
