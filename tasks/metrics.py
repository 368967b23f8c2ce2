"""A worker node's own metrics: counted in the process that runs each task (a prefork child), and
served once per node by the node's main process on `WORKER_METRICS_PORT`, every series labelled
with the node's name.

The children of a prefork node cannot share memory, so the counts live in the files of
`PROMETHEUS_MULTIPROC_DIR` (one directory per node, empty at its start): a task's measurement is
a few writes to a memory-mapped file in its own process, with no network round trip, and the main
process sums the files at scrape time. The API exports none of these series: each sync is counted
by the one node that ran it, so a sum over nodes is the fleet's total.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from celery.concurrency.prefork import TaskPool
from celery.signals import worker_process_init, worker_ready
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from app import metrics
from app.settings import Settings, get_settings
from app.task_names import SYNC_CHAT, SYNC_MESSAGES

log = logging.getLogger(__name__)

# Apart from the global registry: a process that imports this module without being a worker
# (a test, a CLI command) must not start exporting worker series.
WORKER_REGISTRY = CollectorRegistry(auto_describe=True)
TASKS = Counter(
    "dualwrite_tasks",
    "Sync tasks by outcome (applied, skipped, missing, retry, malformed, dead_letter_*), "
    "counted by the worker node that ran them.",
    ["task", "outcome"],
    registry=WORKER_REGISTRY,
)
ROWS = Counter(
    "dualwrite_rows_written",
    "Rows written by syncs, by kind (inserted, updated, removed).",
    ["kind"],
    registry=WORKER_REGISTRY,
)
LAG = Histogram(
    "dualwrite_sync_lag_seconds",
    "Seconds from a chat's JSONB commit to its rows being applied, measured in the worker.",
    buckets=metrics.LAG_BUCKETS,
    registry=WORKER_REGISTRY,
)
OUTCOMES = ("applied", "skipped", "missing", "retry", "malformed")
ROW_KINDS = ("inserted", "updated", "removed")
# Series that alerts read with rate() exist from the start at 0 (see `app.metrics`).
for _task in (SYNC_MESSAGES, SYNC_CHAT):
    for _outcome in OUTCOMES:
        TASKS.labels(_task, _outcome)
for _kind in ROW_KINDS:
    ROWS.labels(_kind)

# What a node serves: its syncs, and what its sweeps published (`app.jobs` counts those in the
# API's families). The other API families exist in a worker only as zeros.
FAMILIES = frozenset(
    {
        "dualwrite_tasks",
        "dualwrite_rows_written",
        "dualwrite_sync_lag_seconds",
        "dualwrite_enqueued",
        "dualwrite_enqueue_failures",
        "dualwrite_publish_seconds",
    }
)


class WorkerMetrics:
    """What the sync tasks record. A failure to record is logged, never raised into a task."""

    def task(
        self,
        task: str,
        outcome: str,
        *,
        lags: Sequence[float] = (),
        rows: Mapping[str, int] | None = None,
    ) -> None:
        try:
            TASKS.labels(task, outcome).inc()
            for kind, count in (rows or {}).items():
                if count:
                    ROWS.labels(kind).inc(count)
            for lag in lags:
                LAG.observe(lag)
        except Exception as exc:  # a full metrics directory must not fail a sync
            log.warning("could not record worker metrics: %s", exc)


class NodeCollector(Collector):
    """The families of `sources` named in `FAMILIES`, each sample labelled `node`: a node's
    series stay apart however they are scraped (one target per node, or one address in front of
    several), and `sum without (node)` is the fleet's."""

    def __init__(self, sources: Iterable[Collector], node: str) -> None:
        self._sources = list(sources)
        self._node = node

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            for family in source.collect():
                if family.name not in FAMILIES:
                    continue
                labelled = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    labelled.add_sample(
                        sample.name,
                        {**sample.labels, "node": self._node},
                        sample.value,
                        sample.timestamp,
                        sample.exemplar,
                    )
                yield labelled


def node_registry(settings: Settings, node: str, *, prefork: bool) -> CollectorRegistry | None:
    """What the node's main process serves, or None when it cannot see its tasks' counts (a
    prefork pool without PROMETHEUS_MULTIPROC_DIR: each child counts in its own memory)."""
    metrics.check_multiprocess(settings.prometheus_multiproc_dir)
    if settings.prometheus_multiproc_dir:
        sources: list[Collector] = [metrics.CompactingCollector(settings.prometheus_multiproc_dir)]
    elif prefork:
        return None
    else:  # solo or threads: the tasks run in this process
        sources = [WORKER_REGISTRY, REGISTRY]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(sources, node))
    return registry


_server: Any = None


@worker_ready.connect
def serve_node_metrics(sender: Any, **_: Any) -> None:
    """Serve this node's metrics from its main process, once its pool runs."""
    global _server
    settings = get_settings()
    if _server is not None:  # ready again after the consumer restarted: already serving
        return
    if not settings.worker_metrics_port:
        log.info("worker metrics are not served (WORKER_METRICS_PORT=0)")
        return
    node = str(sender.hostname)
    try:
        registry = node_registry(settings, node, prefork=isinstance(sender.pool, TaskPool))
    except RuntimeError as exc:
        log.error("worker metrics are not served: %s", exc)
        return
    if registry is None:
        log.error(
            "worker metrics are not served: the prefork pool needs PROMETHEUS_MULTIPROC_DIR (a "
            "directory of this node's own, empty at its start) to see its children's counts"
        )
        return
    address, port = settings.worker_metrics_address, settings.worker_metrics_port
    try:
        _server, _thread = start_http_server(port, address, registry)
    except OSError as exc:  # metrics are not a reason to stop syncing; the scrape's `up` says it
        log.error("worker metrics are not served: cannot listen on %s:%d: %s", address, port, exc)
        return
    log.info("worker metrics of node %s at http://%s:%d/metrics", node, address, port)


@worker_process_init.connect
def close_inherited_listener(**_: Any) -> None:
    # A child forked after the server started holds a copy of its socket: closed, so that the
    # port is free as soon as the main process is gone.
    if _server is not None:
        _server.socket.close()
