"""Domain metrics of the orchestrator (`agentrun_*`: base units; labels workflow, stage, pathway).

Counters and histograms are counted in this process as things happen. What lives in the database
(tasks per stage and state, the oldest ready task's age) is read at scrape time by
`backlog_collector`, so it is right whichever process made the change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agentrun_server.serving._scrape import ScrapedCollector
from agentrun_server.storage import StageBacklog

_log = logging.getLogger(__name__)

_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

TASK_STATES = ("ready", "scheduled", "leased", "done", "dead", "cancelled")


class OrchestratorMetrics:
    """Tasks leased, completed by pathway, failed, expired, dead, redriven; queue wait and run
    time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.leased = Counter(
            "agentrun_tasks_leased", "Leases granted.", ["workflow", "stage"], registry=registry
        )
        self.completed = Counter(
            "agentrun_tasks_completed",
            "Tasks completed, by pathway (empty at a terminal stage).",
            ["workflow", "stage", "pathway"],
            registry=registry,
        )
        self.failed = Counter(
            "agentrun_tasks_failed",
            "Failed attempts reported by workers, by what followed (retry, dead).",
            ["workflow", "stage", "result"],
            registry=registry,
        )
        self.expired = Counter(
            "agentrun_tasks_expired_leases",
            "Leases that passed their deadline unsettled (each costs an attempt).",
            ["workflow", "stage"],
            registry=registry,
        )
        self.dead = Counter(
            "agentrun_tasks_dead",
            "Tasks that became dead letters, by how their last attempt ended: failed (non-"
            "retryable, or attempts exhausted), lease_expired, stream_closed (the worker closed "
            "its stream holding the lease), or not_resumed (its stream ended and no worker "
            "resumed the lease within the grace).",
            ["workflow", "stage", "reason"],
            registry=registry,
        )
        self.redriven = Counter(
            "agentrun_tasks_redriven", "Dead tasks sent back to ready.", registry=registry
        )
        self.queue_wait = Histogram(
            "agentrun_task_queue_wait_seconds",
            "Time from a task becoming ready (created) to its lease.",
            ["workflow", "stage"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.run_seconds = Histogram(
            "agentrun_task_run_seconds",
            "Time from a lease to its completion.",
            ["workflow", "stage"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.workers = Gauge(
            "agentrun_workers_connected", "Open Work streams (stage workers).", registry=registry
        )
        # `labels()` validates and locks on every call; the hot path looks children up once.
        self.child = cache(self._child)

    @staticmethod
    def _child(metric: Any, *labels: str) -> Any:
        return metric.labels(*labels)


def backlog_collector(
    loop: asyncio.AbstractEventLoop,
    snapshot: Callable[[], Coroutine[Any, Any, tuple[list[StageBacklog], dict[str, int]]]],
) -> ScrapedCollector[tuple[list[StageBacklog], dict[str, int]]]:
    """Per-stage task counts and ages, and worker credits, read when Prometheus scrapes.

    `snapshot` is a coroutine function run on the server's event loop; it returns the stage
    backlogs and free credits per workflow.
    """
    return ScrapedCollector(loop, snapshot, _backlog_families, "backlog")


def _backlog_families(
    snapshot: tuple[list[StageBacklog], dict[str, int]],
) -> Iterator[Metric]:
    backlog, credits = snapshot
    tasks = GaugeMetricFamily(
        "agentrun_stage_tasks",
        "Tasks per workflow stage and state (ready, scheduled, leased, done, dead, cancelled).",
        labels=["workflow", "stage", "state"],
    )
    created = CounterMetricFamily(
        "agentrun_tasks_enqueued",
        "Tasks ever created per stage (runs entering a workflow, completions moving on).",
        labels=["workflow", "stage"],
    )
    oldest = GaugeMetricFamily(
        "agentrun_stage_oldest_ready_age_seconds",
        "Age of the oldest ready task per stage; 0 when none is ready.",
        labels=["workflow", "stage"],
    )
    for stage in backlog:
        counts = (
            stage.ready,
            stage.scheduled,
            stage.leased,
            stage.done,
            stage.dead,
            stage.cancelled,
        )
        for state, count in zip(TASK_STATES, counts, strict=True):
            tasks.add_metric([stage.workflow, stage.stage, state], count)
        created.add_metric([stage.workflow, stage.stage], sum(counts))
        oldest.add_metric([stage.workflow, stage.stage], stage.oldest_ready_age_seconds)
    free = GaugeMetricFamily(
        "agentrun_worker_free_credits",
        "Credits of connected workers not held by a lease, per workflow.",
        labels=["workflow"],
    )
    for workflow, count in sorted(credits.items()):
        free.add_metric([workflow], count)
    yield from (tasks, created, oldest, free)
