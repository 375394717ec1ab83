"""Domain metrics of the ingestion service (base units, bounded labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class IngestionMetrics:
    """Runs and bytes ingested, rejected by reason, batch sizes and commit latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "agentrun_ingest_runs",
            "Runs received, by result (accepted, duplicate, rejected).",
            ["result"],
            registry=registry,
        )
        self.rejected = Counter(
            "agentrun_ingest_rejected_runs",
            "Runs rejected, by reason.",
            ["reason"],
            registry=registry,
        )
        self.bytes = Counter(
            "agentrun_ingest_stored_bytes", "Encoded bytes of the runs stored.", registry=registry
        )
        self.batch_runs = Histogram(
            "agentrun_ingest_batch_runs",
            "Runs per upload message.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "agentrun_ingest_commit_seconds",
            "Time to commit one upload message's runs.",
            registry=registry,
        )
