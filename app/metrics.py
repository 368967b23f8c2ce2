"""Prometheus metrics of the API and the worker (prefix `dualwrite_`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ENQUEUE_FAILURES = Counter(
    "dualwrite_enqueue_failures_total",
    "After-commit publishes that failed or timed out (the sweep repairs those chats).",
    ["task"],
)
ENQUEUED = Counter("dualwrite_enqueued_total", "Tasks published after a commit.", ["task"])
PUBLISH_SECONDS = Histogram(
    "dualwrite_publish_seconds",
    "Time spent publishing the tasks of one request after its commit.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SYNC_LAG = Histogram(
    "dualwrite_sync_lag_seconds",
    "Seconds from a chat's JSONB commit to its rows being applied, measured in the worker.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
TASKS = Counter("dualwrite_tasks_total", "Sync tasks by outcome.", ["task", "outcome"])
ROWS = Counter("dualwrite_rows_total", "Rows written by syncs, by kind.", ["kind"])
REQUESTS = Counter(
    "dualwrite_requests_total", "HTTP requests by route and status.", ["method", "route", "status"]
)
