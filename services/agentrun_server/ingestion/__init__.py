"""The ingestion service: client-streamed batches of runs, validated and stored exactly once."""

from __future__ import annotations

from agentrun_server.ingestion._abandon import AbandonSweep
from agentrun_server.ingestion._facets import FacetBackfill
from agentrun_server.ingestion._metrics import IngestionMetrics, live_runs_collector
from agentrun_server.ingestion._retention import RetentionSweep
from agentrun_server.ingestion._servicer import IngestionLimits, IngestionServicer

__all__ = [
    "AbandonSweep",
    "FacetBackfill",
    "IngestionLimits",
    "IngestionMetrics",
    "IngestionServicer",
    "RetentionSweep",
    "live_runs_collector",
]
