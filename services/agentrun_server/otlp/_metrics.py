"""Metrics of the OTLP receiver (`agentrun_otlp_*`: base units, bounded labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REFUSAL_REASONS = ("malformed", "too_large", "invalid", "run_refused")


class OtlpMetrics:
    """Spans received by result and refused by reason; traces' runs opened and finished."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.spans = Counter(
            "agentrun_otlp_spans",
            "OTLP spans received, by result: stored, duplicate (an exporter's retry: kept "
            "already), refused.",
            ["result"],
            registry=registry,
        )
        for result in ("stored", "duplicate", "refused"):
            self.spans.labels(result)
        self.refused_spans = Counter(
            "agentrun_otlp_refused_spans",
            "OTLP spans refused (answered in the export's partial_success), by reason: "
            "malformed (ids), too_large (over max_run_bytes), invalid (breaks a run's rules), "
            "run_refused (the trace's run finished, or would pass max_live_run_bytes).",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSAL_REASONS:
            self.refused_spans.labels(reason)
        self.runs_opened = Counter(
            "agentrun_otlp_runs_opened",
            "Live runs opened by a trace's first spans.",
            registry=registry,
        )
        self.runs_finished = Counter(
            "agentrun_otlp_runs_finished",
            "Traces' runs finished: their root span ended and no span came for the quiet period.",
            registry=registry,
        )
