"""The OTLP trace receiver: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on the
server's own port, under its keys, TLS and limits. Each trace is a live run of the collection the
export names; each batch of its spans is appended to the run as they come."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.trace.v1 import trace_pb2

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.wire.checks import InvalidRun, check_agent_run
from agentrun_server._checks import check_name
from agentrun_server.auth import Access
from agentrun_server.ingestion import IngestionLimits
from agentrun_server.ingestion._facets import facets_of_run
from agentrun_server.ingestion._live import apply_patch, fold_finished
from agentrun_server.otlp._assemble import MAIN, Assembly, assemble
from agentrun_server.otlp._logs import log_spans
from agentrun_server.otlp._metrics import OtlpMetrics
from agentrun_server.otlp._spans import SpanView, span_view
from agentrun_server.otlp._values import Attributes, attributes, to_value
from agentrun_server.serving import add_service
from agentrun_server.storage import Folded, NewSpan, Storage, TraceBatch

Context = grpc.aio.ServicerContext[Any, Any]

COLLECTION_HEADER = "x-agentrun-collection"
COLLECTION_ATTRIBUTE = "agentrun.collection"
SERVICE_ATTRIBUTE = "agentrun.service.name"
DEFAULT_COLLECTION = "otel"
"""The collection of spans whose export and resource name none (no `service.name` either)."""
RUN_PREFIX = "otel-"
"""A trace's run id: this and the trace id in hex, so every export of a trace lands in one run."""


def run_id_of(trace_id: bytes) -> str:
    return RUN_PREFIX + trace_id.hex()


def project(
    state: bytes | None, spans: Sequence[bytes], seen: Mapping[bytes, SpanView] | None = None
) -> tuple[bytes, bytes]:
    """The storage `Project`: new spans (in start order) as a patch of their run. `seen` holds
    the views the receiver made of them already (by their encoding), so none is mapped twice."""
    assembly = Assembly.loads(state)
    views = [
        (seen.get(s) if seen else None) or span_view(trace_pb2.Span.FromString(s)) for s in spans
    ]
    patch = assemble(assembly, views)
    return patch.SerializeToString(deterministic=True), assembly.dumps()


def rebuild(run_id: str, spans: Sequence[bytes]) -> Folded:
    """The storage `Rebuild`: the run made from every span of its trace, in start order. A
    trace of plain spans only (no model call, no tool result) keeps them in its metadata, beside
    an empty transcript."""
    run = run_pb.AgentRun(id=run_id)
    views = [span_view(trace_pb2.Span.FromString(s)) for s in spans]
    apply_patch(run, assemble(Assembly(), views, whole=True))
    if not run.transcripts:
        run.transcripts.add(key=MAIN, name=MAIN)
    name = run.name if run.HasField("name") else None
    return Folded(run.SerializeToString(), name, facets_of_run(run))


class _Receiver:
    """What the trace and log receivers share: the collection an export names, and appending
    one request's spans, trace by trace, counting what was refused."""

    def __init__(
        self,
        storage: Storage,
        metrics: OtlpMetrics,
        limits: IngestionLimits,
        access: Access,
    ) -> None:
        self._storage = storage
        self._metrics = metrics
        self._limits = limits
        self._access = access

    async def _collection(self, header: str, resource: Attributes) -> str:
        """The collection an export names (first found: the header, the resource's
        `agentrun.collection`, its `service.name`); the storage makes it on first use."""
        if header:
            name, field = header, COLLECTION_HEADER
        elif resource.get(COLLECTION_ATTRIBUTE):
            name, field = str(resource[COLLECTION_ATTRIBUTE]), COLLECTION_ATTRIBUTE
        else:
            name, field = str(resource.get("service.name") or DEFAULT_COLLECTION), "service.name"
        name = check_name(field, name)
        await self._access.check(field, create=(name, ""))
        return name

    async def _receive(
        self, header: str, resources: Sequence[tuple[Attributes, Sequence[trace_pb2.Span]]]
    ) -> tuple[int, str]:
        """Keep each resource's spans in its collection's runs; (spans refused, why)."""
        rejected = 0
        why: list[str] = []

        def refuse(count: int, reason: str, message: str) -> None:
            nonlocal rejected
            rejected += count
            self._metrics.refused_spans.labels(reason).inc(count)
            if len(why) < 5:
                why.append(message)

        # By trace: its spans, and the collection of the first resource that sent one of them
        # (two resources of one export may name two; the run goes to one).
        batches: dict[str, tuple[str, list[NewSpan]]] = {}
        seen: dict[bytes, SpanView] = {}
        for resource, spans in resources:
            collection = await self._collection(header, resource)
            service = str(resource.get("service.name") or "")
            for span in spans:
                view = self._checked(span)
                if isinstance(view, tuple):
                    refuse(1, *view)
                    continue
                if service:  # kept with the span: the run's metadata says where it came from
                    span.attributes.add(key=SERVICE_ATTRIBUTE).value.string_value = service
                    view.service = service
                data = span.SerializeToString()
                seen[data] = view
                kept = batches.setdefault(run_id_of(span.trace_id), (collection, []))[1]
                kept.append(NewSpan(span.span_id.hex(), span.start_time_unix_nano, data, view.root))
        if not batches:
            return self._refused(rejected, why)
        # A trace's run may be in another collection than this export names (its first spans
        # came from another process): the key must see that one too.
        await self._access.check("resource_spans", run_ids=list(batches))
        traces = [
            TraceBatch(run_id, collection, kept) for run_id, (collection, kept) in batches.items()
        ]
        outcomes = await self._storage.append_spans(
            traces,
            functools.partial(project, seen=seen),
            fold_finished,
            self._limits.max_live_run_bytes,
            time.time(),
        )
        for trace, outcome in zip(traces, outcomes, strict=True):
            self._metrics.spans.labels("stored").inc(outcome.stored)
            self._metrics.spans.labels("duplicate").inc(outcome.duplicates)
            if outcome.opened:
                self._metrics.runs_opened.inc()
            if outcome.refused is not None:
                refuse(
                    len(trace.spans) - outcome.duplicates,
                    "run_refused",
                    f"trace {trace.run_id[len(RUN_PREFIX) :]}: {outcome.refused}",
                )
        return self._refused(rejected, why)

    def _refused(self, rejected: int, why: list[str]) -> tuple[int, str]:
        if rejected:
            self._metrics.spans.labels("refused").inc(rejected)
        return rejected, "; ".join(why)[:4000]

    def _checked(self, span: trace_pb2.Span) -> tuple[str, str] | SpanView:
        """What a span says, or why it cannot be kept (a reason label and a message)."""
        where = f"span {span.span_id.hex() or '(no id)'} of trace {span.trace_id.hex() or '-'}"
        if len(span.trace_id) != 16 or len(span.span_id) != 8:
            return "malformed", f"{where}: trace_id must be 16 bytes and span_id 8"
        size = span.ByteSize()
        if size > self._limits.max_run_bytes:
            return (
                "too_large",
                f"{where}: {size:,} bytes, over max_run_bytes={self._limits.max_run_bytes}",
            )
        view = span_view(span)
        # The rules every run follows, on what the span adds to one (its metadata is the
        # receiver's own, bounded and shallow).
        probe = run_pb.AgentRun(id="probe")
        transcript = probe.transcripts.add(key="probe")
        transcript.messages.extend(view.messages)
        if view.tool_result is not None:
            transcript.messages.append(view.tool_result)
        for owner, fields in ((probe, view.run_fields), (transcript, view.transcript_fields)):
            for key, value in fields.get("metadata", {}).items():
                if key != "scores":  # a run's scores are its own channel (agentrun.run.scores)
                    to_value(value, owner.metadata.fields[str(key)].value)
        try:
            check_agent_run(probe, patch=True)
        except InvalidRun as problem:
            field = problem.field.replace("transcripts[0].", "", 1)
            return "invalid", f"{where}: {field}: {problem.reason}"
        return view


class OtlpTraceServicer(_Receiver):
    """Serves OTLP's TraceService over a `Storage`."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        add_service(server, self, otlp_pb.DESCRIPTOR.services_by_name["TraceService"])

    async def Export(  # gRPC's method name
        self, request: otlp_pb.ExportTraceServiceRequest, context: Context
    ) -> otlp_pb.ExportTraceServiceResponse:
        header = dict(context.invocation_metadata() or ()).get(COLLECTION_HEADER, "")
        resources = [
            (
                attributes(r.resource.attributes),
                [span for scope in r.scope_spans for span in scope.spans],
            )
            for r in request.resource_spans
        ]
        rejected, why = await self._receive(str(header), resources)
        response = otlp_pb.ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = why
        return response


class OtlpLogsServicer(_Receiver):
    """Serves OTLP's LogsService over a `Storage`: the log records of a span (GenAI
    instrumentations in event mode put a model call's messages in them) join its trace's run, as
    one span under it (`log_spans`); records outside any trace are accepted and dropped."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        add_service(server, self, logs_pb.DESCRIPTOR.services_by_name["LogsService"])

    async def Export(  # gRPC's method name
        self, request: logs_pb.ExportLogsServiceRequest, context: Context
    ) -> logs_pb.ExportLogsServiceResponse:
        header = dict(context.invocation_metadata() or ()).get(COLLECTION_HEADER, "")
        resources = [
            (
                attributes(r.resource.attributes),
                log_spans([record for scope in r.scope_logs for record in scope.log_records]),
            )
            for r in request.resource_logs
        ]
        rejected, why = await self._receive(str(header), resources)
        response = logs_pb.ExportLogsServiceResponse()
        if rejected:
            response.partial_success.rejected_log_records = rejected
            response.partial_success.error_message = why
        return response
