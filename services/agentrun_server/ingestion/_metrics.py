"""Domain metrics of the ingestion service (`agentrun_ingest_*`: base units, bounded labels)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from agentrun_server.serving._scrape import ScrapedCollector
from agentrun_server.storage import Storage


class IngestionMetrics:
    """Runs and bytes received and stored, duplicates, rejections, batch sizes, commit latency;
    live run events by status, their commit latency, live runs finished; runs deleted and the
    space given back."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received_runs = Counter(
            "agentrun_ingest_received_runs", "Runs received in upload messages.", registry=registry
        )
        self.received_bytes = Counter(
            "agentrun_ingest_received_bytes",
            "Encoded bytes of the runs received.",
            registry=registry,
        )
        self.stored_runs = Counter(
            "agentrun_ingest_stored_runs", "Runs stored (first time seen).", registry=registry
        )
        self.stored_bytes = Counter(
            "agentrun_ingest_stored_bytes", "Encoded bytes of the runs stored.", registry=registry
        )
        self.duplicate_runs = Counter(
            "agentrun_ingest_duplicate_runs",
            "Runs whose id was stored already in the same collection (idempotent resends).",
            registry=registry,
        )
        self.rejected_runs = Counter(
            "agentrun_ingest_rejected_runs",
            "Runs rejected, by reason (invalid, too_large, conflict).",
            ["reason"],
            registry=registry,
        )
        for reason in ("invalid", "too_large", "conflict"):
            self.rejected_runs.labels(reason)
        self.batch_runs = Histogram(
            "agentrun_ingest_batch_runs",
            "Runs per upload message.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "agentrun_ingest_commit_seconds",
            "Time to commit one upload message's runs to storage.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.open_streams = Gauge(
            "agentrun_ingest_open_streams", "Upload streams open now.", registry=registry
        )
        self.live_events = Counter(
            "agentrun_ingest_live_events",
            "Live run events answered, by status (stored, duplicate, refused).",
            ["status"],
            registry=registry,
        )
        for status in ("stored", "duplicate", "refused"):
            self.live_events.labels(status)
        self.live_commit_seconds = Histogram(
            "agentrun_ingest_live_commit_seconds",
            "Time to make one StreamAgentRunEvents message's events durable (then they are acked).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.live_runs_finished = Counter(
            "agentrun_ingest_live_runs_finished",
            "Live runs finished (each then enters its collection's workflow).",
            registry=registry,
        )
        self.live_runs_entered_on_abandon = Counter(
            "agentrun_ingest_live_runs_entered_on_abandon",
            "Abandoned live runs entered into their workflow (collections with "
            "enter_workflow_on_abandon).",
            registry=registry,
        )
        self.deleted_runs = Counter(
            "agentrun_ingest_deleted_runs",
            "Runs deleted, by reason: request (DeleteAgentRuns, DeleteCollection) or retention "
            "(a collection's retention_days, by this server's sweep).",
            ["reason"],
            registry=registry,
        )
        for reason in ("request", "retention"):
            self.deleted_runs.labels(reason)
        self.reclaimed_bytes = Counter(
            "agentrun_storage_reclaimed_bytes",
            "Bytes of the database file given back to the file system after deletions (SQLite "
            "in incremental vacuum mode; PostgreSQL reuses them through autovacuum instead).",
            registry=registry,
        )
        self.open_event_streams = Gauge(
            "agentrun_ingest_open_event_streams",
            "StreamAgentRunEvents streams open now.",
            registry=registry,
        )


def live_runs_collector(
    loop: asyncio.AbstractEventLoop, storage: Storage, live_run_timeout_seconds: float
) -> ScrapedCollector[tuple[int, int]]:
    """`agentrun_live_runs{state}`: running and abandoned live runs, counted in the database
    at each scrape (a run is abandoned after `live_run_timeout_seconds` without an event)."""

    async def read() -> tuple[int, int]:
        counts = await storage.count_live_runs(time.time() - live_run_timeout_seconds)
        return sum(c.running for c in counts.values()), sum(c.abandoned for c in counts.values())

    return ScrapedCollector(loop, read, _live_run_families, "live run")


def _live_run_families(counts: tuple[int, int]) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "agentrun_live_runs",
        "Live runs not finished, by state: running (an event within --live-run-timeout) and "
        "abandoned (none since; the next event reopens it).",
        labels=["state"],
    )
    family.add_metric(["running"], counts[0])
    family.add_metric(["abandoned"], counts[1])
    yield family
