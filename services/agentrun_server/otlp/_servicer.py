"""The OTLP trace receiver: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on the
server's own port, under its keys, TLS and limits. Each trace is a live run of the collection the
export names; each batch of its spans is appended to the run as they come."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import grpc
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
from agentrun_server.otlp._metrics import OtlpMetrics
from agentrun_server.otlp._spans import span_view
from agentrun_server.otlp._values import attributes
from agentrun_server.serving import add_service
from agentrun_server.storage import Folded, NewSpan, Storage

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


def project(state: bytes | None, spans: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The storage `Project`: new spans (in start order) as a patch of their run."""
    assembly = Assembly.loads(state)
    patch = assemble(assembly, [span_view(trace_pb2.Span.FromString(s)) for s in spans])
    return patch.SerializeToString(deterministic=True), assembly.dumps()


def rebuild(run_id: str, spans: Sequence[bytes]) -> Folded:
    """The storage `Rebuild`: the run made from every span of its trace, in start order. A
    trace of plain spans only (no model call, no tool result) keeps them in its metadata, beside
    an empty transcript."""
    run = run_pb.AgentRun(id=run_id)
    apply_patch(run, run_pb.AgentRun.FromString(project(None, spans)[0]))
    if not run.transcripts:
        run.transcripts.add(key=MAIN, name=MAIN)
    name = run.name if run.HasField("name") else None
    return Folded(run.SerializeToString(), name, facets_of_run(run))


class OtlpTraceServicer:
    """Serves OTLP's TraceService over a `Storage`."""

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
        self._collections: dict[str, str] = {}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        add_service(server, self, otlp_pb.DESCRIPTOR.services_by_name["TraceService"])

    async def _collection_id(self, name: str, field: str) -> str:
        """The id of the collection named, made on first use (bound to no workflow)."""
        name = check_name(field, name)
        await self._access.check(field, create=(name, ""))
        found = self._collections.get(name)
        if found is None:
            made, _ = await self._storage.create_collection(name, "", "", time.time())
            if len(self._collections) >= 10_000:
                self._collections.clear()
            self._collections[name] = found = made.id
        return found

    async def Export(  # gRPC's method name
        self, request: otlp_pb.ExportTraceServiceRequest, context: Context
    ) -> otlp_pb.ExportTraceServiceResponse:
        header = dict(context.invocation_metadata() or ()).get(COLLECTION_HEADER, "")
        rejected = 0
        why: list[str] = []

        def refuse(count: int, reason: str, message: str) -> None:
            nonlocal rejected
            rejected += count
            self._metrics.refused_spans.labels(reason).inc(count)
            if len(why) < 5:
                why.append(message)

        batches: dict[tuple[str, str], list[NewSpan]] = defaultdict(list)
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            if header:
                name, field = header, COLLECTION_HEADER
            elif resource.get(COLLECTION_ATTRIBUTE):
                name, field = str(resource[COLLECTION_ATTRIBUTE]), COLLECTION_ATTRIBUTE
            else:
                name, field = (
                    str(resource.get("service.name") or DEFAULT_COLLECTION),
                    "service.name",
                )
            collection_id = await self._collection_id(name, field)
            service = str(resource.get("service.name") or "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    problem = self._problem(span)
                    if problem is not None:
                        refuse(1, *problem)
                        continue
                    if service:  # kept with the span: the run's metadata says where it came from
                        span.attributes.add(key=SERVICE_ATTRIBUTE).value.string_value = service
                    batches[(collection_id, run_id_of(span.trace_id))].append(
                        NewSpan(
                            span.span_id.hex(),
                            span.start_time_unix_nano,
                            span.SerializeToString(),
                            not span.parent_span_id,
                        )
                    )
        now = time.time()
        for (collection_id, run_id), spans in batches.items():
            # A trace's run may be in another collection than this export names (its first
            # spans came from another process): the key must see that one too.
            await self._access.check("resource_spans", run_ids=[run_id])
            outcome = await self._storage.append_spans(
                run_id,
                collection_id,
                spans,
                project,
                fold_finished,
                self._limits.max_live_run_bytes,
                now,
            )
            self._metrics.spans.labels("stored").inc(outcome.stored)
            self._metrics.spans.labels("duplicate").inc(outcome.duplicates)
            if outcome.opened:
                self._metrics.runs_opened.inc()
            if outcome.refused is not None:
                refuse(
                    len(spans) - outcome.duplicates,
                    "run_refused",
                    f"trace {run_id[len(RUN_PREFIX) :]}: {outcome.refused}",
                )
        response = otlp_pb.ExportTraceServiceResponse()
        if rejected:
            self._metrics.spans.labels("refused").inc(rejected)
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = "; ".join(why)[:4000]
        return response

    def _problem(self, span: trace_pb2.Span) -> tuple[str, str] | None:
        """Why a span cannot be kept (a reason label and a message), or None."""
        where = f"span {span.span_id.hex() or '(no id)'} of trace {span.trace_id.hex() or '-'}"
        if len(span.trace_id) != 16 or len(span.span_id) != 8:
            return "malformed", f"{where}: trace_id must be 16 bytes and span_id 8"
        size = span.ByteSize()
        if size > self._limits.max_run_bytes:
            return (
                "too_large",
                f"{where}: {size:,} bytes, over max_run_bytes={self._limits.max_run_bytes}",
            )
        patch = assemble(Assembly(), [span_view(span)])
        patch.id = "probe"
        try:
            check_agent_run(patch, patch=True)
        except InvalidRun as problem:
            return "invalid", f"{where}: {problem.field}: {problem.reason}"
        return None
