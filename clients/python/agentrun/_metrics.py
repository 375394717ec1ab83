"""Client-side metrics of the writer and the Runner, in prometheus-client's default registry.

They appear wherever the host application serves that registry (`prometheus_client.
start_http_server(port)`, or its framework's /metrics); nothing is served by agentrun itself. All
writers (and all runners) of a process add up into the same series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WRITER_QUEUED_RUNS = Gauge(
    "agentrun_writer_queued_runs", "Runs logged and waiting in writer queues (not yet sent)."
)
WRITER_RUNS = Counter(
    "agentrun_writer_runs",
    "Runs the writer settled, by result: accepted, duplicate, rejected, undelivered.",
    ["result"],
)
WRITER_SENT_BYTES = Counter(
    "agentrun_writer_sent_bytes", "Encoded bytes of runs sent in upload attempts."
)
WRITER_RETRIES = Counter(
    "agentrun_writer_retries",
    "Upload attempts that failed with a retryable status and were retried.",
)
WRITER_DROPPED_RUNS = Counter(
    "agentrun_writer_dropped_runs",
    "Runs given up on (undelivered): retries cut off by finish(), or a non-retryable status.",
)
WRITER_SPOOL_RUNS = Gauge(
    "agentrun_writer_spool_runs", "Runs in writer spools on disk, not yet acknowledged."
)
WRITER_SPOOL_BYTES = Gauge("agentrun_writer_spool_bytes", "Bytes of writer spool segments on disk.")
WRITER_SPOOL_EVENTS = Gauge(
    "agentrun_writer_spool_events",
    "Live run events in writer spools on disk, not yet acknowledged.",
)
for _result in ("accepted", "duplicate", "rejected", "undelivered"):
    WRITER_RUNS.labels(_result)
WRITER_LIVE_EVENTS = Counter(
    "agentrun_writer_live_events",
    "Live run events the server acknowledged, by result: stored, duplicate, refused.",
    ["result"],
)
for _result in ("stored", "duplicate", "refused"):
    WRITER_LIVE_EVENTS.labels(_result)

RUNNER_TASKS = Counter(
    "agentrun_runner_tasks",
    "Tasks the Runner's stage functions finished, by stage and outcome (done, failed).",
    ["stage", "outcome"],
)
RUNNER_TASK_SECONDS = Histogram(
    "agentrun_runner_task_seconds",
    "Time a stage function took per task.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
RUNNER_TASKS_IN_FLIGHT = Gauge(
    "agentrun_runner_tasks_in_flight", "Tasks leased to the Runner and not yet settled."
)
