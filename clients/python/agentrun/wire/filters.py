"""Run filters as people write them: `scores.reward < 1`, `metadata.model = gpt-4o`,
`scores.correct = true` (the `--where` of `agentrun runs list`, the `where` of
`Client.list_runs`, the web console's filter box), into `agentrun.v1.RunFilter`s that the server
matches on its index."""

from __future__ import annotations

import re

from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.wire.limits import MAX_RUN_FILTERS

_OPS = {
    "=": pb.FILTER_OP_EQ,
    "==": pb.FILTER_OP_EQ,
    "!=": pb.FILTER_OP_NE,
    "<": pb.FILTER_OP_LT,
    "<=": pb.FILTER_OP_LE,
    ">": pb.FILTER_OP_GT,
    ">=": pb.FILTER_OP_GE,
}
_EXPRESSION = re.compile(
    r"\s*(?P<field>(?:scores|metadata)\.[^\s=!<>]+)\s*(?P<op>==|=|!=|<=|>=|<|>)\s*(?P<value>.*?)\s*"
)


def parse_filter(expression: str) -> pb.RunFilter:
    """One filter from `FIELD OP VALUE`: FIELD is `scores.NAME` or `metadata.FIELD`; OP one of
    = (or ==), !=, <, <=, >, >=; VALUE a number, true or false, or a string (quoted when it
    would read as a number or a bool: `metadata.version = "2"`).

    Raises:
        ValueError: the expression is not of that form, or compares a string by order.
    """
    match = _EXPRESSION.fullmatch(expression)
    if match is None or not match["value"]:
        raise ValueError(
            f"{expression!r}: write FIELD OP VALUE, e.g. 'scores.reward < 1' or "
            "'metadata.model = gpt-4o' (FIELD: scores.NAME or metadata.FIELD; OP: = != < <= > >=)"
        )
    out = pb.RunFilter(field=match["field"], op=_OPS[match["op"]])
    value = match["value"]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        out.text = value[1:-1]
    elif value.lower() in ("true", "false"):
        out.flag = value.lower() == "true"
    else:
        try:
            out.number = float(value)
        except ValueError:
            out.text = value
    if out.WhichOneof("value") == "text" and out.op not in (pb.FILTER_OP_EQ, pb.FILTER_OP_NE):
        raise ValueError(f"{expression!r}: a string compares by = or != only")
    return out


def parse_filters(expressions: list[str] | tuple[str, ...]) -> list[pb.RunFilter]:
    """Every filter of a listing (all must hold).

    Raises:
        ValueError: one is malformed (see `parse_filter`), or there are more than 8.
    """
    if len(expressions) > MAX_RUN_FILTERS:
        raise ValueError(f"{len(expressions)} filters: at most {MAX_RUN_FILTERS}")
    return [parse_filter(e) for e in expressions]
