"""Domain metrics of the orchestrator (base units, bounded labels: workflow, stage, pathway)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OrchestratorMetrics:
    """Tasks leased, settled by outcome, expired; queue wait; connected workers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.leased = Counter(
            "agentrun_tasks_leased", "Leases granted.", ["workflow", "stage"], registry=registry
        )
        self.completed = Counter(
            "agentrun_tasks_completed",
            "Tasks completed, by pathway.",
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
            "Leases that expired or whose stream closed.",
            registry=registry,
        )
        self.queue_wait = Histogram(
            "agentrun_task_queue_wait_seconds",
            "Time from task creation to its lease.",
            ["workflow", "stage"],
            registry=registry,
        )
        self.workers = Gauge("agentrun_workers_connected", "Open Work streams.", registry=registry)
