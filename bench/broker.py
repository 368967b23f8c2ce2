"""The broker's share of a publish, on Redis and on RabbitMQ (quorum queues, publisher confirms):
single sends and batches through the API's bounded publisher, a queue-depth read (`status`,
`/ops/`, `/readyz` on RabbitMQ), and how long a send takes to give up on a hung broker (Redis
stopped with SIGSTOP, RabbitMQ behind a proxy that stops forwarding), against its bound.
Redis is the reference; RabbitMQ has no target but the bound.

    .venv/bin/python -m bench.broker [--sends 2000] [--batches 20] [--batch-size 500]
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from app import broker as app_broker
from app.jobs import Job
from app.settings import Settings
from app.task_names import SYNC_CHAT
from bench import infra
from harness.processes import RedisServer
from harness.rabbit import RabbitVhost, TcpProxy


def job(n: int) -> Job:
    return Job(SYNC_CHAT, (f"00000000-0000-0000-0000-{n:012d}", 1))


# The broker's settings, those of a way to it that can hang, and how to hang and resume it.
Broker = tuple[Settings, Settings, Callable[[], None], Callable[[], None]]


@contextmanager
def redis_broker() -> Iterator[Broker]:
    server = RedisServer().start()
    try:
        yield (
            Settings(redis_url=server.url),
            Settings(redis_url=server.url),
            lambda: os.kill(server.pid, signal.SIGSTOP),
            lambda: os.kill(server.pid, signal.SIGCONT),
        )
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.stop()


@contextmanager
def rabbit_broker() -> Iterator[Broker]:
    vhost = RabbitVhost("bench").start()
    proxy = TcpProxy().start()
    try:
        yield (
            Settings(broker_url=vhost.url, redis_url=None),
            Settings(broker_url=vhost.url_on(proxy.port), redis_url=None),
            proxy.hang,
            proxy.resume,
        )
    finally:
        proxy.close()
        vhost.stop()


def measure(broker: Broker, args: Any) -> tuple[list[float], float, list[float], list[float]]:
    settings, hangable, hang, resume = broker
    publisher = app_broker.bounded_publisher(settings)
    publisher(job(0))  # opens the pooled connection
    singles = []
    for n in range(args.sends):
        started = time.perf_counter()
        publisher(job(n))
        singles.append(time.perf_counter() - started)
    batches = []
    for b in range(args.batches):
        jobs = [job(b * args.batch_size + i) for i in range(args.batch_size)]
        started = time.perf_counter()
        assert publisher.many(jobs) == [None] * len(jobs)
        batches.append(time.perf_counter() - started)
    reads = []
    inspector = app_broker.BrokerInspector(settings, timeout=1.0)
    for _ in range(50):
        started = time.perf_counter()
        inspector.depths()
        reads.append(time.perf_counter() - started)
    inspector.close()
    gave_up = []
    publisher = app_broker.bounded_publisher(hangable)
    publisher(job(0))
    hang()
    try:
        for n in range(5):
            started = time.perf_counter()
            try:
                publisher(job(n))
            except Exception:  # the send gives up: what is measured is when
                gave_up.append(time.perf_counter() - started)
    finally:
        resume()
    rate = args.batch_size * len(batches) / sum(batches)
    return singles, rate, reads, gave_up


def main() -> None:
    args = infra.options(__doc__, {"sends": 50, "batches": 2, "batch_size": 50}, sends=2000,
                         batches=20, batch_size=500)  # fmt: skip
    bound_settings = Settings()
    tries = bound_settings.publish_max_retries + 1
    bound = (
        tries
        * (
            bound_settings.publish_connect_timeout_seconds
            + bound_settings.publish_socket_timeout_seconds
        )
        + bound_settings.publish_max_retries * bound_settings.publish_retry_interval_seconds
    )
    rows, depth_rows, hung_rows, rates = [], [], [], {}
    for name, broker in (("redis", redis_broker), ("rabbitmq", rabbit_broker)):
        with broker() as running:
            singles, rate, reads, gave_up = measure(running, args)
        rows.append([name, *infra.stats(singles, 1000)])
        depth_rows.append([name, *infra.stats(reads, 1000)])
        hung_rows.append(
            [name, f"{len(gave_up)} of 5", max(gave_up, default=float("nan")), bound,
             infra.verdict(max(gave_up, default=bound * 10), bound + 0.1)]
        )  # fmt: skip
        rates[name] = rate
    infra.show("one send (ms), sequential", ["broker", *infra.STATS], rows)
    infra.show(
        f"batched sends ({args.batch_size} a batch, one producer)",
        ["broker", "jobs/s", "vs redis"],
        [[n, r, r / rates["redis"]] for n, r in rates.items()],
    )
    infra.show("queue depth read (ms)", ["broker", *infra.STATS], depth_rows)
    infra.show(
        "a send to a hung broker gives up (s)",
        ["broker", "gave up", "slowest", "bound", "verdict"],
        hung_rows,
    )


if __name__ == "__main__":
    main()
