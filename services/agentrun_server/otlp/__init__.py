"""The OTLP receiver: agents already traced with OpenTelemetry stream their runs with no SDK.

Each trace is a live run (`otel-` and the trace id), in the collection the export names; its
spans, mapped once from the GenAI semantic conventions, OpenInference and their older forms
(`_spans`), are assembled into transcripts without repeated history (`_assemble`) and appended
as they come (`_servicer`; a span's log records join it as a span under it, `_logs`); the run finishes once quiet after its root span (`_finish`).
"""

from __future__ import annotations

from agentrun_server.otlp._finish import TraceFinishSweep
from agentrun_server.otlp._metrics import OtlpMetrics
from agentrun_server.otlp._servicer import OtlpLogsServicer, OtlpTraceServicer

__all__ = ["OtlpLogsServicer", "OtlpMetrics", "OtlpTraceServicer", "TraceFinishSweep"]
