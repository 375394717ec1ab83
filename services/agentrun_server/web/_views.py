"""What the pages show, made from the wire form: runs' messages as Docent shows them (roles, tool
calls with their arguments, tool results, reasoning), values as indented JSON, times, and a
workflow's stages laid out as a graph. Everything returned is plain text for the templates to
escape: nothing run-supplied becomes markup here."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as ingest
from agentrun.v1 import workflow_pb2 as wf

RUN_STATES = {
    ingest.AGENT_RUN_STATE_RUNNING: "running",
    ingest.AGENT_RUN_STATE_FINISHED: "finished",
    ingest.AGENT_RUN_STATE_ABANDONED: "abandoned",
}
TASK_STATES = {
    wf.TASK_STATE_READY: "ready",
    wf.TASK_STATE_LEASED: "leased",
    wf.TASK_STATE_DONE: "done",
    wf.TASK_STATE_DEAD: "dead",
    wf.TASK_STATE_CANCELLED: "cancelled",
}

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def visible(text: str) -> str:
    """`text` with its control characters (ANSI escapes, NUL, ...) as their Unicode pictures
    (ESC as ␛), so a terminal's colour codes read as text and hide nothing; newlines and tabs
    kept."""
    return _CONTROLS.sub(lambda m: chr(0x2400 + ord(m[0])) if m[0] != "\x7f" else "␡", text)


def value(v: run_pb.Value) -> Any:
    """A wire `Value` as Python data (a big integer as its decimal text)."""
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "list_value":
        return [value(item) for item in v.list_value.values]
    if kind == "struct_value":
        return struct(v.struct_value)
    return getattr(v, kind)


def struct(s: run_pb.StructValue) -> dict[str, Any]:
    return {f.key: value(f.value) for f in s.fields}


def as_json(data: Any) -> str:
    """Indented JSON for reading (strings as they are, not \\u-escaped)."""
    if isinstance(data, str):
        return data
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


def when(ts: Timestamp) -> str:
    """A timestamp as `2026-12-07 11:50:23Z` ("" when unset)."""
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def age(d: Duration) -> str:
    """A duration in the largest unit that reads well: `42 s`, `7 min`, `3.5 h`, `2.1 d`."""
    s = seconds(d)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def score(s: run_pb.Score) -> str:
    kind = s.WhichOneof("kind")
    if kind == "double_value":
        return f"{s.double_value:g}"
    if kind == "bool_value":
        return str(s.bool_value).lower()
    return str(s.int_value) if kind == "int_value" else ""


def scores(run: run_pb.AgentRun) -> list[tuple[str, str]]:
    return sorted((name, score(s)) for name, s in run.scores.items())


def metadata(m: run_pb.Metadata) -> list[tuple[str, str, str]]:
    """(field, value as JSON text, description) of each metadata field, by name."""
    return sorted((key, as_json(value(f.value)), f.description) for key, f in m.fields.items())


def merge(run: run_pb.AgentRun, patch: run_pb.AgentRun) -> int:
    """Apply a live run's event `patch` to `run` as the server folds it (messages appended to
    the transcript of their key, metadata and scores merged by key, name and description
    replaced when set); the messages it added."""
    by_key = {t.key: t for t in run.transcripts}
    added = 0
    for t in patch.transcripts:
        target = by_key.get(t.key)
        if target is None:
            target = by_key[t.key] = run.transcripts.add(key=t.key, id=t.id)
        if t.HasField("name"):
            target.name = t.name
        if t.HasField("description"):
            target.description = t.description
        for key, f in t.metadata.fields.items():
            target.metadata.fields[key].CopyFrom(f)
        target.messages.extend(t.messages)
        added += len(t.messages)
    for key, f in patch.metadata.fields.items():
        run.metadata.fields[key].CopyFrom(f)
    for name, s in patch.scores.items():
        run.scores[name].CopyFrom(s)
    if patch.HasField("name"):
        run.name = patch.name
    if patch.HasField("description"):
        run.description = patch.description
    return added


def element_id(key: str) -> str:
    """A stable HTML id for a transcript key (keys are run-supplied: never used as ids)."""
    return "t-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Part:
    kind: str  # "text", "reasoning", "refusal"
    text: str


@dataclass
class Call:
    id: str
    function: str
    arguments: str
    title: str = ""
    view: str = ""
    parse_error: str = ""


@dataclass
class Message:
    role: str
    parts: list[Part] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    model: str = ""
    tool_call_id: str = ""
    function: str = ""
    error: str = ""
    time: str = ""


def message(m: run_pb.ChatMessage) -> Message:
    role = m.WhichOneof("role") or "user"
    out = Message(role=role, time=when(m.timestamp) if m.HasField("timestamp") else "")
    if m.WhichOneof("content") == "text":
        out.parts.append(Part("text", m.text))
    elif m.WhichOneof("content") == "parts":
        for p in m.parts.parts:
            if p.WhichOneof("kind") == "reasoning":
                r = p.reasoning
                out.parts.append(Part("reasoning", "(redacted)" if r.redacted else r.reasoning))
            elif p.WhichOneof("kind") == "text":
                kind = "refusal" if p.text.refusal else "text"
                out.parts.append(Part(kind, p.text.text))
    if role == "assistant":
        a = m.assistant
        out.model = a.model
        for c in a.tool_calls:
            out.calls.append(
                Call(
                    c.id,
                    c.function,
                    as_json(struct(c.arguments)),
                    c.view.title if c.HasField("view") else "",
                    c.view.content if c.HasField("view") else "",
                    c.parse_error,
                )
            )
    elif role == "tool":
        t = m.tool
        out.tool_call_id = t.tool_call_id
        out.function = t.function
        if t.HasField("error"):
            out.error = as_json(struct(t.error))
    return out


@dataclass
class TranscriptView:
    key: str
    id: str
    name: str
    element: str
    messages: list[Message]
    metadata: list[tuple[str, str, str]]
    total: int
    """Messages in the transcript: `messages` are those from `start` on, at most a page."""
    start: int = 0

    @property
    def more(self) -> int:
        """Messages after those shown."""
        return self.total - self.start - len(self.messages)


def transcripts(run: run_pb.AgentRun, limit: int | None = None) -> list[TranscriptView]:
    """The run's transcripts, each with its first `limit` messages (None: all)."""
    return [transcript(t, 0, limit) for t in run.transcripts]


def transcript(
    t: run_pb.Transcript, start: int, limit: int | None, until: int | None = None
) -> TranscriptView:
    """A transcript with its messages from `start`, at most `limit` of them (None: the rest),
    counting only the first `until` (None: all; a live run's page counts those it was drawn
    with, as later ones reach it by its event stream); only the messages shown are made into
    views (a 50 MB run's page reads the first ones only)."""
    total = len(t.messages) if until is None else min(until, len(t.messages))
    end = total if limit is None else min(total, start + limit)
    return TranscriptView(
        t.key,
        t.id,
        t.name,
        element_id(t.key),
        [message(m) for m in t.messages[start:end]],
        metadata(t.metadata),
        total,
        start,
    )


def appended(run: run_pb.AgentRun, known: set[str]) -> list[tuple[TranscriptView, bool]]:
    """The transcripts of events folded into `run`, each with whether the page shows it
    already (its element id in `known`, which then takes the new ones): what a page appends to
    a transcript, or adds as a new one."""
    groups = []
    for t in transcripts(run):
        groups.append((t, t.element in known))
        known.add(t.element)
    return groups


@dataclass
class Node:
    name: str
    x: int
    y: int
    counts: dict[str, int]


@dataclass
class Edge:
    label: str
    x1: int
    y1: int
    x2: int
    y2: int


@dataclass
class Graph:
    width: int
    height: int
    nodes: list[Node]
    edges: list[Edge]


NODE_W, NODE_H, GAP_X, GAP_Y = 180, 64, 140, 28


def graph(workflow: wf.Workflow, counts: dict[str, dict[str, int]]) -> Graph:
    """The stages in columns by their distance from the first stage (a pathway's target one
    column further right, where it is first reached), pathways as edges labelled with their
    names; stages no pathway reaches stand in a last column."""
    stages = [s.name for s in workflow.stages]
    depth: dict[str, int] = {}
    if stages:
        depth[stages[0]] = 0
        frontier = [stages[0]]
        by_name = {s.name: s for s in workflow.stages}
        while frontier:
            nxt = []
            for name in frontier:
                for p in by_name[name].pathways:
                    if p.next_stage and p.next_stage in by_name and p.next_stage not in depth:
                        depth[p.next_stage] = depth[name] + 1
                        nxt.append(p.next_stage)
            frontier = nxt
    last = max(depth.values(), default=-1) + 1
    for name in stages:
        depth.setdefault(name, last)
    rows: dict[int, int] = {}
    place: dict[str, tuple[int, int]] = {}
    for name in stages:
        column = depth[name]
        row = rows.get(column, 0)
        rows[column] = row + 1
        place[name] = (20 + column * (NODE_W + GAP_X), 20 + row * (NODE_H + GAP_Y))
    nodes = [Node(n, *place[n], counts.get(n, {})) for n in stages]
    labels: dict[tuple[str, str], list[str]] = {}  # pathways to one stage share an edge
    for s in workflow.stages:
        for p in s.pathways:
            if p.next_stage in place:
                labels.setdefault((s.name, p.next_stage), []).append(p.name)
    edges = []
    for (source, target), names in labels.items():
        (x1, y1), (x2, y2) = place[source], place[target]
        edges.append(Edge(", ".join(names), x1 + NODE_W, y1 + NODE_H // 2, x2, y2 + NODE_H // 2))
    columns = max(depth.values(), default=0) + 1
    height = max(rows.values(), default=1)
    return Graph(
        40 + columns * NODE_W + (columns - 1) * GAP_X,
        40 + height * NODE_H + (height - 1) * GAP_Y,
        nodes,
        edges,
    )


def pathway_ends(workflow: wf.Workflow) -> Iterable[tuple[str, str]]:
    """(stage, pathway) of the pathways that end the workflow (no next stage)."""
    for s in workflow.stages:
        for p in s.pathways:
            if not p.next_stage:
                yield s.name, p.name
