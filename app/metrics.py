"""Prometheus metrics (prefix `dualwrite_`) of the API, and how a process group exports them.

Every process counts its own work. With `PROMETHEUS_MULTIPROC_DIR` set (read by prometheus_client
itself, before any metric exists), each process keeps its counts in files there, and whichever
process answers a scrape reads and sums them all: the API under `uvicorn --workers` or gunicorn,
and a worker node's prefork children (`tasks.metrics`, served by the node's main process on
`WORKER_METRICS_PORT`). The workers' own series (tasks, rows, the lag histogram) are theirs alone;
the API exports none of them. Database gauges are cluster-wide facts: read at scrape time by the
process that answers, once per scrape, never summed over processes.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
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
# Set by each API process's publisher as its buffer changes; across the processes of one API
# instance the live ones add up ("livesum": a process that exited leaves the sum).
PUBLISH_BUFFERED = Gauge(
    "dualwrite_publish_buffered",
    "Jobs committed but not yet sent by the API's background publishers (every process of "
    "this API instance).",
    multiprocess_mode="livesum",
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


DEAD_LETTER_REASONS = (
    "failed",
    "worker_lost",
    "bad_elements",
    "diverged",
)  # always shown, 0 when none
# Buckets of `dualwrite_sync_lag_seconds`, which the workers observe (`tasks.metrics`).
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def check_multiprocess(directory: str | None) -> None:
    """Refuse a PROMETHEUS_MULTIPROC_DIR that prometheus_client did not see when it was
    imported (the variable must be in the process's environment from its start): its metrics
    would count in memory while the scrape reads the files, and export zeros."""
    if directory and values.ValueClass is values.MutexValue:
        raise RuntimeError(
            f"PROMETHEUS_MULTIPROC_DIR={directory} is set, but prometheus_client was imported "
            "without it: set it in the environment the process starts with"
        )


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry of what every process writing to `path` (`PROMETHEUS_MULTIPROC_DIR`) counted:
    the processes of one API instance, or the prefork children of one worker node."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CompactingCollector(path))
    return registry


class CompactingCollector(MultiProcessCollector):
    """prometheus_client's multiprocess collector, which also folds the files of dead processes
    into one archive per metric type before it reads.

    Each process writes its own `counter_<pid>.db` and `histogram_<pid>.db`, and they stay after
    it exits (its counts must: counters never go down). A worker replaces its children every
    `WORKER_MAX_TASKS_PER_CHILD` tasks, a gunicorn worker is replaced after `max_requests`: files
    would pile up for good, and every scrape would read them all. Counter and histogram values
    are plain sums per key, so the dead ones add into `<type>_archive.db` and go; a live gauge
    of a dead process (`multiprocess_mode="live..."`) is removed, as `mark_process_dead` does.
    Scrapes run in threads, and in any process of an API instance: a lock on a file of the
    directory holds the fold and the read together, so that no scrape (nor another fold) sees a
    value both in a dead file and in the archive.
    """

    ADDITIVE = ("counter", "histogram")
    LOCK = "fold.lock"  # not `*.db`: never read as metrics

    def __init__(self, path: str) -> None:
        super().__init__(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Any]:
        # One open file description per call: flock excludes threads of one process too.
        with open(os.path.join(self._path, self.LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._fold()
            except OSError as exc:  # the scrape goes on with the files as they are
                log.warning("could not fold the metrics files of dead processes: %s", exc)
            # A process creating its file (a child just forked) has it empty for a moment, and
            # prometheus_client fails on an empty file: left out, it has counted nothing yet.
            files = [
                path for path in glob.glob(os.path.join(self._path, "*.db")) if _size(path) >= 8
            ]
            return iter(list(self.merge(files, accumulate=True)))  # type: ignore[no-untyped-call]

    def _fold(self) -> None:
        dead: dict[str, list[str]] = {}
        for path in glob.glob(os.path.join(self._path, "*.db")):
            kind, _, rest = os.path.basename(path).partition("_")
            pid = rest.removesuffix(".db").rpartition("_")[2]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind in self.ADDITIVE and _size(path) < 8:
                os.remove(path)  # died while creating it: it holds nothing
            elif kind in self.ADDITIVE:
                dead.setdefault(kind, []).append(path)
            elif kind == "gauge" and rest.startswith("live"):
                os.remove(path)
        for kind, paths in dead.items():
            archive = os.path.join(self._path, f"{kind}_archive.db")
            totals: dict[str, float] = {}
            for path in [archive, *paths] if os.path.exists(archive) else paths:
                for key, value, _, _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
                    totals[key] = totals.get(key, 0.0) + value
            # Written aside and renamed over the archive, then the dead files go: a crash in
            # between can count a dead process twice, never lose it.
            building = archive + ".tmp"
            if os.path.exists(building):
                os.remove(building)
            folded = MmapedDict(building)  # type: ignore[no-untyped-call]
            try:
                for key, value in totals.items():
                    folded.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
            finally:
                folded.close()  # type: ignore[no-untyped-call]
            os.replace(building, archive)
            for path in paths:
                os.remove(path)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # a live gauge of a process that just exited
        return 0


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process, so one that lives
        return True
    return True


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
