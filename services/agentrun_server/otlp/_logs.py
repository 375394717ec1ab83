"""OTLP log records as spans: what a model call's log records say (the
`gen_ai.client.inference.operation.details` event of GenAI instrumentations in event mode, or
the older per-message events) becomes one span under the span that emitted them, so the one
mapping (`_spans`) reads it. Records outside a trace belong to no run."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

USAGE_PREFIXES = ("gen_ai.usage.", "llm.token_count.")
CONTENT_ATTRIBUTES = (
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
)


def _event_name(record: logs_pb2.LogRecord) -> str:
    if record.event_name:
        return record.event_name
    for kv in record.attributes:
        if kv.key == "event.name":
            return kv.value.string_value
    return ""


def log_spans(records: Sequence[logs_pb2.LogRecord]) -> list[trace_pb2.Span]:
    """One span per emitting span: its records' content, a child of that span (its id derived
    from the records, so a retried export is a duplicate)."""
    groups: dict[tuple[bytes, bytes], list[logs_pb2.LogRecord]] = defaultdict(list)
    for record in records:
        if len(record.trace_id) == 16 and len(record.span_id) == 8:
            groups[(record.trace_id, record.span_id)].append(record)
    spans = []
    for (trace_id, span_id), group in groups.items():
        digest = hashlib.blake2b(digest_size=8)
        digest.update(trace_id + span_id)
        for record in group:
            digest.update(record.SerializeToString(deterministic=True))
        times = [r.time_unix_nano or r.observed_time_unix_nano for r in group]
        span = trace_pb2.Span(
            trace_id=trace_id,
            span_id=digest.digest(),
            parent_span_id=span_id,
            name=_event_name(group[0]) or "log",
            start_time_unix_nano=min(times),
            end_time_unix_nano=max(times),
        )
        for record in group:
            content = [kv for kv in record.attributes if kv.key in CONTENT_ATTRIBUTES]
            if content:
                # The emitting span counts the call's usage already.
                span.attributes.extend(
                    kv for kv in record.attributes if not kv.key.startswith(USAGE_PREFIXES)
                )
                continue
            # An older per-message event: its body (or attributes) as a span event.
            event = span.events.add(name=_event_name(record), time_unix_nano=record.time_unix_nano)
            event.attributes.extend(kv for kv in record.attributes if kv.key != "event.name")
            body = record.body
            if body.HasField("kvlist_value"):
                event.attributes.extend(body.kvlist_value.values)
            elif body.HasField("string_value"):
                event.attributes.add(key="content").value.string_value = body.string_value
        spans.append(span)
    return spans
