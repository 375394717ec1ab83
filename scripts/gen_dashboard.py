"""Write deploy/grafana/agentrun.json, the Grafana dashboard, from the panel list below.

    python scripts/gen_dashboard.py           # write it (make gen)
    python scripts/gen_dashboard.py --check   # fail if the committed file differs (make gen-check)

The dashboard imports as Grafana users import dashboards: a stable uid (`agentrun`, so links and
provisioned copies stay one dashboard), `__inputs` asking for the Prometheus data source on import
(and a `datasource` variable when provisioned, deploy/grafana/provisioning/), and template
variables for job, instance and workflow that the servers' series are filtered by (the Clients
row's come from the clients' own processes). Every
expression is tested against a real Prometheus, the variables at their "All" value
(tests/e2e/test_prometheus.py reads them from the generated file).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "deploy" / "grafana" / "agentrun.json"

UID = "agentrun"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Metrics labelled by workflow (the orchestrator's), filtered by the workflow variable too.
WORKFLOW_METRICS = re.compile(
    r"agentrun_(tasks_(leased|completed|failed|expired_leases|dead|enqueued)|task_queue_wait_seconds"
    r"|task_run_seconds|stage_tasks|stage_oldest_ready_age_seconds|worker_free_credits)"
)
CLIENT_METRICS = re.compile(r"agentrun_(writer|runner)_")
# Metric names only: label names such as grpc_method in `by (...)` are left alone.
_SERIES = re.compile(r"\b(agentrun_[a-z_]+|grpc_server_[a-z_]+)(?:\{([^}]*)\})?")


def filtered(expr: str) -> str:
    """`expr` with every series selector narrowed to the job and instance variables (and the
    workflow variable where the metric has that label)."""

    def narrow(match: re.Match[str]) -> str:
        metric, given = match.group(1), match.group(2)
        if CLIENT_METRICS.match(metric):  # scraped from the clients' processes, not the servers'
            return match.group(0)
        matchers = [m for m in (given or "").split(", ") if m]
        matchers += ['job=~"$job"', 'instance=~"$instance"']
        if WORKFLOW_METRICS.match(metric):
            matchers.append('workflow=~"$workflow"')
        return f"{metric}{{{', '.join(matchers)}}}"

    return _SERIES.sub(narrow, expr)


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value query variable over a label's values, "All" by default."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
    }


RATE = "$__rate_interval"
INGESTION = 'grpc_service="agentrun.v1.IngestionService"'
AGENTRUN_GRPC = 'grpc_service=~"agentrun\\\\.v1\\\\..*"'
# Codes that mean the server failed the call (client mistakes such as InvalidArgument excluded).
SERVER_ERROR_CODES = (
    "Unknown|DeadlineExceeded|Unimplemented|Internal|Unavailable|DataLoss|ResourceExhausted"
)


def quantiles(metric: str, by: str = "", selector: str = "") -> list[tuple[str, str]]:
    """p50 and p99 of a histogram, summed across instances."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{prefix}p{int(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


# (row title, [(panel title, unit, description, [(expr, legend), ...]), ...])
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]] = [
    (
        "Ingestion",
        [
            (
                "Runs / s",
                "ops",
                "Runs received, stored for the first time, and recognised as duplicates.",
                [
                    (f"sum(rate(agentrun_ingest_received_runs_total[{RATE}]))", "received"),
                    (f"sum(rate(agentrun_ingest_stored_runs_total[{RATE}]))", "stored"),
                    (f"sum(rate(agentrun_ingest_duplicate_runs_total[{RATE}]))", "duplicates"),
                ],
            ),
            (
                "Bytes / s",
                "Bps",
                "Encoded run bytes received and stored.",
                [
                    (f"sum(rate(agentrun_ingest_received_bytes_total[{RATE}]))", "received"),
                    (f"sum(rate(agentrun_ingest_stored_bytes_total[{RATE}]))", "stored"),
                ],
            ),
            (
                "Rejected runs / s by reason",
                "ops",
                "invalid (a field is wrong), too_large (over max_run_bytes), conflict (id stored in another collection).",
                [
                    (
                        f"sum by (reason) (rate(agentrun_ingest_rejected_runs_total[{RATE}]))",
                        "{{reason}}",
                    )
                ],
            ),
            (
                "Upload and commit latency",
                "s",
                "UploadAgentRuns stream duration, and the storage commit of one upload message.",
                [
                    (expr, f"upload {legend}")
                    for expr, legend in quantiles(
                        "grpc_server_handling_seconds",
                        selector=f'{INGESTION}, grpc_method="UploadAgentRuns"',
                    )
                ]
                + [
                    (expr, f"commit {legend}")
                    for expr, legend in quantiles("agentrun_ingest_commit_seconds")
                ],
            ),
            (
                "Open upload streams",
                "short",
                "UploadAgentRuns streams open now.",
                [("sum(agentrun_ingest_open_streams)", "streams")],
            ),
            (
                "Runs deleted / s, space given back",
                "short",
                "Runs deleted by request (DeleteAgentRuns, DeleteCollection) and by their "
                "collection's retention, and bytes of the SQLite file given back to the file "
                "system after them.",
                [
                    (
                        f"sum by (reason) (rate(agentrun_ingest_deleted_runs_total[{RATE}]))",
                        "deleted / s ({{reason}})",
                    ),
                    (
                        f"sum(rate(agentrun_storage_reclaimed_bytes_total[{RATE}]))",
                        "bytes given back / s",
                    ),
                ],
            ),
        ],
    ),
    (
        "OpenTelemetry in",
        [
            (
                "OTLP spans / s by result",
                "ops",
                "Spans received through the OTLP receiver: stored, duplicate (an exporter's "
                "retry), refused (answered in partial_success).",
                [
                    (
                        f"sum by (result) (rate(agentrun_otlp_spans_total[{RATE}]))",
                        "{{result}}",
                    )
                ],
            ),
            (
                "OTLP spans refused / s by reason",
                "ops",
                "malformed (ids), too_large (over max_run_bytes), invalid (breaks a run's rules), "
                "run_refused (the trace's run finished, or grew past max_live_run_bytes).",
                [
                    (
                        f"sum by (reason) (rate(agentrun_otlp_refused_spans_total[{RATE}]))",
                        "{{reason}}",
                    )
                ],
            ),
            (
                "Traces' runs opened and finished / s",
                "ops",
                "Live runs opened by a trace's first spans, and finished once quiet after their "
                "root span.",
                [
                    (f"sum(rate(agentrun_otlp_runs_opened_total[{RATE}]))", "opened"),
                    (f"sum(rate(agentrun_otlp_runs_finished_total[{RATE}]))", "finished"),
                ],
            ),
        ],
    ),
    (
        "Live runs",
        [
            (
                "Live run events / s by status",
                "ops",
                "Events of live runs answered: stored, duplicate (a resend), refused (a gap, a finished run, a bad event).",
                [
                    (
                        f"sum by (status) (rate(agentrun_ingest_live_events_total[{RATE}]))",
                        "{{status}}",
                    )
                ],
            ),
            (
                "Event commit latency",
                "s",
                "Time to make one StreamAgentRunEvents message's events durable, before they are acked.",
                [
                    (expr, f"commit {legend}")
                    for expr, legend in quantiles("agentrun_ingest_live_commit_seconds")
                ],
            ),
            (
                "Live runs finished / s, open event streams",
                "short",
                "Live runs finished (each enters its collection's workflow then, unless it entered "
                "when abandoned), abandoned runs entered (collections with "
                "enter_workflow_on_abandon), and StreamAgentRunEvents streams open now.",
                [
                    (
                        f"sum(rate(agentrun_ingest_live_runs_finished_total[{RATE}]))",
                        "finished / s",
                    ),
                    (
                        f"sum(rate(agentrun_ingest_live_runs_entered_on_abandon_total[{RATE}]))",
                        "entered when abandoned / s",
                    ),
                    ("sum(agentrun_ingest_open_event_streams)", "open streams"),
                ],
            ),
            (
                "Live runs by state",
                "short",
                "Live runs not finished: running (an event within --live-run-timeout), abandoned "
                "(none since; the next event reopens it). Counted in the database at each scrape, "
                "so every replica reports the same figure.",
                [("max by (state) (agentrun_live_runs)", "{{state}}")],
            ),
        ],
    ),
    (
        "gRPC",
        [
            (
                "Calls / s by method and code",
                "ops",
                "Completed calls of both services (go-grpc-prometheus metrics).",
                [
                    (
                        f"sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{{{AGENTRUN_GRPC}}}[{RATE}])) > 0",
                        "{{grpc_method}} {{grpc_code}}",
                    )
                ],
            ),
            (
                "Server error ratio",
                "percentunit",
                f"Share of calls ending {SERVER_ERROR_CODES.replace('|', ', ')}.",
                [
                    (
                        f'sum by (grpc_service) (rate(grpc_server_handled_total{{{AGENTRUN_GRPC}, grpc_code=~"{SERVER_ERROR_CODES}"}}[{RATE}]))'
                        f" / sum by (grpc_service) (rate(grpc_server_handled_total{{{AGENTRUN_GRPC}}}[{RATE}]))",
                        "{{grpc_service}}",
                    )
                ],
            ),
            (
                "Unary latency p99 by method",
                "s",
                "99th percentile handling time of unary calls.",
                [
                    (
                        f'histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{{{AGENTRUN_GRPC}, grpc_type="unary"}}[{RATE}])))',
                        "{{grpc_method}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Orchestrator",
        [
            (
                "Tasks completed / s by stage and pathway",
                "ops",
                "Completions; the pathway names the next stage's way in (empty at a terminal stage).",
                [
                    (
                        f"sum by (workflow, stage, pathway) (rate(agentrun_tasks_completed_total[{RATE}]))",
                        "{{workflow}}/{{stage}} -> {{pathway}}",
                    )
                ],
            ),
            (
                "Failed attempts / s",
                "ops",
                "Failures reported by workers, by what followed (retry, dead); lease expiries; and "
                "tasks that became dead letters, by how their last attempt ended.",
                [
                    (
                        f"sum by (workflow, stage, result) (rate(agentrun_tasks_failed_total[{RATE}]))",
                        "{{workflow}}/{{stage}} {{result}}",
                    ),
                    (
                        f"sum by (workflow, stage) (rate(agentrun_tasks_expired_leases_total[{RATE}]))",
                        "{{workflow}}/{{stage}} lease expired",
                    ),
                    (
                        f"sum by (workflow, stage, reason) (rate(agentrun_tasks_dead_total[{RATE}]))",
                        "{{workflow}}/{{stage}} dead ({{reason}})",
                    ),
                ],
            ),
            (
                "Backlog by stage",
                "short",
                "Tasks waiting (ready, or scheduled for a retry) and leased, per stage. Every "
                "replica reports the whole database's counts: max over replicas, never sum.",
                [
                    (
                        "sum by (workflow, stage) (max by (workflow, stage, state) "
                        '(agentrun_stage_tasks{state=~"ready|scheduled"}))',
                        "{{workflow}}/{{stage}} waiting",
                    ),
                    (
                        'max by (workflow, stage) (agentrun_stage_tasks{state="leased"})',
                        "{{workflow}}/{{stage}} leased",
                    ),
                ],
            ),
            (
                "Oldest ready task age",
                "s",
                "How long the oldest ready task of each stage has waited.",
                [
                    (
                        "max by (workflow, stage) (agentrun_stage_oldest_ready_age_seconds)",
                        "{{workflow}}/{{stage}}",
                    )
                ],
            ),
            (
                "Dead tasks",
                "short",
                "Tasks that exhausted their attempts or failed non-retryably; redrive them once fixed.",
                [
                    (
                        'max by (workflow, stage) (agentrun_stage_tasks{state="dead"})',
                        "{{workflow}}/{{stage}}",
                    )
                ],
            ),
            (
                "Workers and free credits",
                "short",
                "Connected Work streams, and their credits not held by a lease.",
                [
                    ("sum(agentrun_workers_connected)", "workers"),
                    (
                        "sum by (workflow) (agentrun_worker_free_credits)",
                        "{{workflow}} free credits",
                    ),
                ],
            ),
            (
                "Queue wait and run time",
                "s",
                "Ready -> leased (queue wait) and leased -> completed (run time).",
                [
                    (expr, f"wait {legend}")
                    for expr, legend in quantiles("agentrun_task_queue_wait_seconds")
                ]
                + [
                    (expr, f"run {legend}")
                    for expr, legend in quantiles("agentrun_task_run_seconds")
                ],
            ),
        ],
    ),
    (
        "Clients",
        [
            (
                "Writer runs / s by result",
                "ops",
                "What AgentRunWriters made of the runs logged: accepted, duplicate, rejected, undelivered.",
                [
                    (
                        f"sum by (result) (rate(agentrun_writer_runs_total[{RATE}]))",
                        "{{result}}",
                    )
                ],
            ),
            (
                "Writer queue, spool, retries and drops",
                "short",
                "Runs waiting in writer queues and in spools on disk, live run events in spools "
                "(not yet acknowledged); "
                "retried uploads and dropped runs per second.",
                [
                    ("sum by (instance) (agentrun_writer_queued_runs)", "{{instance}} queued"),
                    ("sum by (instance) (agentrun_writer_spool_runs)", "{{instance}} spooled"),
                    (
                        "sum by (instance) (agentrun_writer_spool_events)",
                        "{{instance}} spooled live run events",
                    ),
                    (f"sum(rate(agentrun_writer_retries_total[{RATE}]))", "retries / s"),
                    (f"sum(rate(agentrun_writer_dropped_runs_total[{RATE}]))", "dropped / s"),
                ],
            ),
            (
                "Runner tasks / s by stage and outcome",
                "ops",
                "Tasks the Runners' stage functions finished: done or failed.",
                [
                    (
                        f"sum by (stage, outcome) (rate(agentrun_runner_tasks_total[{RATE}]))",
                        "{{stage}} {{outcome}}",
                    )
                ],
            ),
            (
                "Runner task time",
                "s",
                "Time a stage function takes per task.",
                quantiles("agentrun_runner_task_seconds", by="stage"),
            ),
        ],
    ),
]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "type": "row",
                "id": next_id,
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        for i, (title, unit, description, targets) in enumerate(row_panels):
            panels.append(
                {
                    "type": "timeseries",
                    "id": next_id,
                    "title": title,
                    "description": description,
                    "datasource": DATASOURCE,
                    "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                    "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {
                            "datasource": DATASOURCE,
                            "expr": filtered(expr),
                            "legendFormat": legend,
                            "refId": chr(ord("A") + j),
                        }
                        for j, (expr, legend) in enumerate(targets)
                    ],
                }
            )
            next_id += 1
        y += ((len(row_panels) + 2) // 3) * 8
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus that scrapes agentrun's /metrics",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "uid": UID,
        "title": "agentrun",
        "description": "Ingestion and orchestration of LLM agent runs: throughput, latency, backlog.",
        "tags": ["agentrun", "grpc"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"},
                    "hide": 0,
                    "refresh": 1,
                },
                variable("job", "Job", "label_values(up, job)"),
                variable("instance", "Instance", 'label_values(up{job=~"$job"}, instance)'),
                variable(
                    "workflow",
                    "Workflow",
                    'label_values(agentrun_stage_tasks{job=~"$job"}, workflow)',
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `make gen`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
