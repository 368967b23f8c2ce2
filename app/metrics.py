"""Prometheus metrics (prefix `dualwrite_`).

The API's own metrics live in its process. Worker metrics are measured in the worker processes
and kept in one Redis hash beside the broker's queues, so that the API's `/metrics` can show them
whatever process or container the workers run in. Database gauges are read at scrape time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import redis
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from app.task_names import SYNC_CHAT, SYNC_MESSAGES

log = logging.getLogger(__name__)

ENQUEUE_FAILURES = Counter(
    "dualwrite_enqueue_failures_total",
    "After-commit publishes that failed or timed out (the sweep repairs those chats).",
    ["task"],
)
PUBLISH_DROPPED = Counter(
    "dualwrite_publish_dropped_total",
    "Jobs the API's background publisher dropped without trying to send them: its buffer was "
    "full (buffer_full), or it was shutting down (shutdown). The sweep repairs those chats.",
    ["reason"],
)
ENQUEUED = Counter("dualwrite_enqueued_total", "Tasks published after a commit.", ["task"])
COALESCED = Counter(
    "dualwrite_coalesced_total",
    "Tasks not published because one for the same chat was still waiting in the queue.",
    ["task"],
)
PUBLISH_SECONDS = Histogram(
    "dualwrite_publish_seconds",
    "Time the API's background publisher spent sending one batch of jobs.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SHADOW_READS = Counter(
    "dualwrite_shadow_reads_total",
    "In verify_reads: pages read from both JSONB and table, by outcome (match, mismatch, behind).",
    ["outcome"],
)
# Series that alerts read with rate() or increase() exist from the start at 0: a labelled
# counter would otherwise appear at its first increment, and that first one would not count.
for _outcome in ("match", "mismatch", "behind"):
    SHADOW_READS.labels(_outcome)
for _reason in ("buffer_full", "shutdown"):
    PUBLISH_DROPPED.labels(_reason)
for _task in (SYNC_MESSAGES, SYNC_CHAT):
    ENQUEUE_FAILURES.labels(_task)
    ENQUEUED.labels(_task)
REQUESTS = Counter(
    "dualwrite_requests_total",
    "HTTP requests by method (other: none of the usual ones), route template (unmatched: no "
    "route) and status.",
    ["method", "route", "status"],
)
# Every label of a request comes from a fixed set, whatever the client sends: the server takes
# any token as a method, and each new label value would be a new series held for good.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUSES = frozenset(int(status) for status in HTTPStatus)


def request_labels(method: str, route: object, status: int) -> tuple[str, str, str]:
    """The labels of a request in `dualwrite_requests_total`, each from a bounded set: a usual
    method or "other", a route's template or "unmatched", a standard status or its class."""
    path = getattr(route, "path", None)
    return (
        method if method in METHODS else "other",
        path if isinstance(path, str) else "unmatched",
        str(status) if status in STATUSES else f"{status // 100}xx",
    )


WORKER_KEY = "dualwrite:metrics"
DEAD_LETTER_REASONS = (
    "failed",
    "worker_lost",
    "bad_elements",
    "diverged",
)  # always shown, 0 when none
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class WorkerMetrics:
    """Writes worker measurements into the Redis hash; a failure to write is logged, not raised."""

    def __init__(self, client: Callable[[], redis.Redis]) -> None:
        self._client = client

    def task(
        self,
        task: str,
        outcome: str,
        *,
        lags: Sequence[float] = (),
        rows: Mapping[str, int] | None = None,
    ) -> None:
        fields: dict[str, float] = {f"tasks|{task}|{outcome}": 1}
        for kind, count in (rows or {}).items():
            if count:
                fields[f"rows|{kind}"] = count
        for lag in lags:
            bucket = next((b for b in LAG_BUCKETS if lag <= b), "+Inf")
            fields[f"lag_bucket|{bucket}"] = fields.get(f"lag_bucket|{bucket}", 0) + 1
            fields["lag_sum"] = fields.get("lag_sum", 0) + lag
            fields["lag_count"] = fields.get("lag_count", 0) + 1
        try:
            pipe = self._client().pipeline(transaction=False)
            for field, amount in fields.items():
                pipe.hincrbyfloat(WORKER_KEY, field, amount)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not record worker metrics: %s", exc)


class PublisherCollector(Collector):
    """The API's background publisher, read at scrape time: jobs waiting to be sent."""

    def __init__(self, pending: Callable[[], int]) -> None:
        self._pending = pending

    def collect(self) -> Iterator[Any]:
        buffered = GaugeMetricFamily(
            "dualwrite_publish_buffered",
            "Jobs committed but not yet sent by this API process's background publisher.",
        )
        buffered.add_metric([], self._pending())
        yield buffered


class WorkerMetricsCollector(Collector):
    """Exposes the worker measurements from Redis on the API's `/metrics`.

    The hash is shared with whatever else can write to that Redis: a field that is not a finite
    number, or not of a shape the workers write, is left out (and logged once), so that one bad
    field never costs the whole scrape.
    """

    # Field name -> how many parts separated by "|" it has.
    _SHAPES = {"tasks": 3, "rows": 2, "lag_bucket": 2}

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._reported: set[str] = set()

    def _values(self, raw: Mapping[Any, Any]) -> dict[str, float]:
        values: dict[str, float] = {}
        for key, value in raw.items():
            field = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            parts = field.split("|")
            shape = self._SHAPES.get(parts[0], 1)
            if math.isfinite(number) and len(parts) == shape:
                values[field] = number
            elif field not in self._reported and len(self._reported) < 100:
                self._reported.add(field)
                log.warning(
                    "ignoring field %r of the worker metrics hash %s: %r is not a count the "
                    "workers write",
                    field,
                    WORKER_KEY,
                    value,
                )
        return values

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "dualwrite_worker_metrics_up",
            "1 when this API process could read the workers' metrics from Redis at this scrape, "
            "0 when it could not (the worker series are missing from the scrape then).",
        )
        try:
            raw = self._client.hgetall(WORKER_KEY)
        except redis.RedisError as exc:
            log.warning("could not read the worker metrics hash %s: %s", WORKER_KEY, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        values = self._values(raw)
        tasks = CounterMetricFamily(
            "dualwrite_tasks",
            "Sync tasks by outcome, counted by the workers.",
            labels=["task", "outcome"],
        )
        rows = CounterMetricFamily(
            "dualwrite_rows_written", "Rows written by syncs, by kind.", labels=["kind"]
        )
        for field, value in sorted(values.items()):
            parts = field.split("|")
            if parts[0] == "tasks":
                tasks.add_metric(parts[1:], value)
            elif parts[0] == "rows":
                rows.add_metric(parts[1:], value)
        cumulative, buckets = 0.0, []
        for bound in (*LAG_BUCKETS, "+Inf"):
            cumulative += values.get(f"lag_bucket|{bound}", 0)
            buckets.append((str(float(bound)) if bound != "+Inf" else "+Inf", cumulative))
        lag = HistogramMetricFamily(
            "dualwrite_sync_lag_seconds",
            "Seconds from a chat's JSONB commit to its rows being applied, measured in the worker.",
            buckets=buckets,
            sum_value=values.get("lag_sum", 0.0),
        )
        yield from (tasks, rows, lag)


class Cached:
    """`read()`, kept for `seconds`: scrapes in that window (from several Prometheus servers, or
    a client that scrapes in a loop) share one read instead of each running its queries on the
    API's pool. A failed read is not kept."""

    def __init__(self, read: Callable[[], dict[str, Any]], seconds: float) -> None:
        self._read, self._seconds = read, seconds
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = -math.inf

    def __call__(self) -> dict[str, Any]:
        # One reader at a time: concurrent scrapes wait for it rather than read beside it.
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self._seconds:
                self._value = self._read()
                self._at = time.monotonic()
            return self._value


class DatabaseCollector(Collector):
    """Gauges read from PostgreSQL at scrape time: backlog and its age, dead letters, last
    reconcile."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        try:
            state = self._read()
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("could not read database gauges: %s", exc)
            return
        behind = GaugeMetricFamily(
            "dualwrite_chats_behind", "Chats whose table copy is behind their JSONB."
        )
        behind.add_metric([], state["chats_behind"])
        oldest = GaugeMetricFamily(
            "dualwrite_oldest_behind_seconds",
            "Seconds since the longest-waiting chat's copy fell behind its JSONB (0 when none "
            "is), not counting chats parked in a failed or worker-lost dead letter. Keeps "
            "growing while workers are up but nothing consumes the sync queue.",
        )
        oldest.add_metric([], state["oldest_behind_seconds"])
        dead = GaugeMetricFamily(
            "dualwrite_dead_letters_open", "Open dead letters, by reason.", labels=["reason"]
        )
        for reason in sorted({*DEAD_LETTER_REASONS, *state["dead_letters_open"]}):
            dead.add_metric([reason], state["dead_letters_open"].get(reason, 0))
        drift = GaugeMetricFamily(
            "dualwrite_last_reconcile_drift", "Rows of drift the last finished reconcile found."
        )
        age = GaugeMetricFamily(
            "dualwrite_last_reconcile_age_seconds", "Seconds since the last reconcile finished."
        )
        last = state.get("last_reconcile")
        if last is not None:
            drift.add_metric([], last["drift"])
            age.add_metric([], time.time() - last["finished_at"].timestamp())
        yield from (behind, oldest, dead, drift, age, *_phase_gauges(state["phase"]))


def _phase_gauges(state: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    phase = GaugeMetricFamily(
        "dualwrite_phase",
        "The rollout phase: 1 for the current one (contracted: the JSONB column is gone).",
        labels=["phase"],
    )
    for name in state["phases"]:
        phase.add_metric([name], 1 if name == state["phase"] else 0)
    phase.add_metric(["contracted"], 1 if state["contracted"] else 0)
    held = GaugeMetricFamily("dualwrite_phase_seconds", "Seconds the current phase has held.")
    held.add_metric([], state["held_seconds"])
    gates = GaugeMetricFamily(
        "dualwrite_phase_gate",
        "Gates of the next step forward: 1 open, 0 closed.",
        labels=["to", "gate"],
    )
    for gate in state["gates"]:
        gates.add_metric([state["next"] or "", gate["name"]], 1 if gate["ok"] else 0)
    reverse = GaugeMetricFamily(
        "dualwrite_reverse_backlog",
        "In table_only: chats whose JSONB is behind their rows (the reverse sync's backlog).",
    )
    reverse.add_metric([], state["reverse_backlog"])
    yield from (phase, held, gates, reverse)


class BrokerCollector(Collector):
    """The broker's queues, read at scrape time (at most once per `METRICS_CACHE_SECONDS`,
    through `app.broker.BrokerInspector`): the same depth on Redis and RabbitMQ. Every API
    process reports the same broker: aggregate with `max`, not `sum`."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read  # {"depths": app.broker.QueueDepths}, as `Cached` keeps it

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "dualwrite_broker_up", "1 when the broker answered this scrape's queue read, else 0."
        )
        try:
            depths = self._read()["depths"]
        except Exception as exc:  # a scrape must not fail because the broker is down
            log.warning("could not read the broker's queues: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        waiting = GaugeMetricFamily(
            "dualwrite_queue_messages", "Messages ready in each queue.", labels=["queue"]
        )
        for queue, count in depths.waiting.items():
            waiting.add_metric([queue], count)
        yield waiting
        if depths.unacked is not None:
            unacked = GaugeMetricFamily(
                "dualwrite_queue_unacked",
                "Messages delivered to a worker and not acked yet (Redis only).",
            )
            unacked.add_metric([], depths.unacked)
            yield unacked
        if depths.consumers is not None:
            consumers = GaugeMetricFamily(
                "dualwrite_queue_consumers",
                "Consumers of each queue (RabbitMQ only).",
                labels=["queue"],
            )
            for queue, count in depths.consumers.items():
                consumers.add_metric([queue], count)
            yield consumers
        if depths.dead is not None:
            dead = GaugeMetricFamily(
                "dualwrite_broker_dead_lettered",
                "Messages RabbitMQ dead-lettered past the delivery limit, not yet recorded in "
                "the database's dead letters (RabbitMQ only).",
            )
            dead.add_metric([], depths.dead)
            yield dead
