"""The broker as the API and the CLI see it: a send-only Celery producer with hard time bounds,
the bounded publisher, and what the broker says about its queues and
workers. Nothing here imports `tasks/`: a producer needs the task names, not the tasks."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.connection import Connection

from app import topology
from app.jobs import Job
from app.settings import BrokerKind, Settings
from app.task_names import Queue

log = logging.getLogger(__name__)


def producer(settings: Settings) -> Celery:
    """A Celery app that only sends, to the broker and with the timeouts of these settings.

    It shares `celeryconfig.py` with the workers (serializer, queues, routes), and registers no
    task: `send_task` names the task."""
    app = _app("chat-dualwrite-producer", settings)
    app.conf.broker_connection_timeout = settings.publish_connect_timeout_seconds
    app.conf.broker_transport_options = topology.transport_options(settings, producer=True)
    return app


def _app(name: str, settings: Settings) -> Celery:
    """A Celery app of `celeryconfig.py` on the broker of these settings (which may not be the
    process's own: a test's broker), with the queues as that broker holds them."""
    app = Celery(name, set_as_current=False)
    app.config_from_object("celeryconfig")
    for key, value in topology.celery_options(settings).items():
        app.conf[key] = value
    return app


# Called with the chats whose queued marks belong to jobs that could not be sent.
Release = Callable[[list[str]], None]


class BoundedPublisher:
    """Publishes jobs and gives up after the connect and socket timeouts and at most
    `publish_max_retries` quick retries. It raises (or, in bulk, returns the error) on failure:
    callers go through `app.publisher.BackgroundPublisher` (the API),
    `app.jobs.publish_after_commit` or `publish_many_after_commit`, which count and log instead.

    Coalescing is decided before a job gets here, by the statement that recorded it (see
    `app.repositories.sync_state.QUEUE_MARK`): every job given is sent. A job that cannot be
    sent has its chat's queued mark released through `release`, if given, so that the chat's
    next write sends a sync again instead of waiting for the sweep.

    Build one per process and keep it: it owns a producer app with its connection pool.
    """

    def __init__(self, settings: Settings, release: Release | None = None) -> None:
        self.settings = settings
        self.release = release
        self.app = producer(settings)
        self.policy: dict[str, Any] = {
            "max_retries": settings.publish_max_retries,
            "interval_start": 0,
            "interval_step": settings.publish_retry_interval_seconds,
            "interval_max": settings.publish_retry_interval_seconds,
        }

    def __call__(self, job: Job) -> None:
        """Send one job. Raises on failure."""
        (outcome,) = self.many([job])
        if outcome is not None:
            raise outcome

    def many(self, jobs: Sequence[Job]) -> list[Exception | None]:
        """Send jobs in bulk through one producer and its connection. One outcome per job, in
        order (see `app.jobs.UnsafePublishMany`).

        The first failed send ends the batch: the broker is most likely unreachable, and each
        further send would wait out its own timeouts.
        """
        outcomes: list[Exception | None] = [None] * len(jobs)
        failed: Exception | None = None
        sent = 0
        try:
            with self.app.producer_or_acquire() as connection:
                for i, job in enumerate(jobs):
                    self.app.send_task(
                        job.task,
                        args=job.args,
                        countdown=topology.countdown(self.settings, job.countdown),
                        producer=connection,
                        retry=True,
                        retry_policy=self.policy,
                        add_to_parent=False,
                    )
                    sent = i + 1
        except Exception as exc:  # a send, or acquiring (or releasing) the producer, failed
            failed = exc
        if failed is not None:
            outcomes[sent:] = [failed] * (len(jobs) - sent)
            self._release(jobs[sent:])
        return outcomes

    def _release(self, jobs: Sequence[Job]) -> None:
        # Without this, a mark would hold back every later change of its chat as "coalesced"
        # until the sweep takes it (`COALESCE_TTL_SECONDS`), hiding the failure.
        chats = [job.queued for job in jobs if job.queued is not None]
        if chats and self.release is not None:
            try:
                self.release(chats)
            except Exception as exc:  # the sweep takes the chats after the bound
                log.warning("could not release the queued marks of %d chats: %s", len(chats), exc)


def bounded_publisher(settings: Settings, release: Release | None = None) -> BoundedPublisher:
    """A publisher with these settings' bounds (see `BoundedPublisher`)."""
    return BoundedPublisher(settings, release)


# kombu's Redis transport keeps a queue as a list per priority step, and messages taken but not
# acked yet in one hash for the whole broker.
PRIORITY_SEPARATOR = "\x06\x16"
UNACKED = "unacked"


@dataclass(frozen=True)
class QueueDepths:
    """What the broker says about the project's queues, whichever broker it is.

    `waiting`: messages ready per queue. `unacked`: delivered to a worker and not acked yet
    (Redis keeps them in one hash; AMQP does not tell a client, so None there). `consumers`: per
    queue, on RabbitMQ only. `dead`: on RabbitMQ, messages its delivery limit dead-lettered that
    are not yet recorded in the database (`app.topology.DEAD_LETTER_QUEUE`)."""

    waiting: dict[str, int]
    unacked: int | None = None
    consumers: dict[str, int] | None = None
    dead: int | None = None

    def line(self) -> str:
        """One line for `status` and the ops page."""
        parts = []
        for name, count in self.waiting.items():
            part = f"{name} {count} waiting"
            if self.consumers is not None:
                part += f" ({self.consumers.get(name, 0)} consumers)"
            parts.append(part)
        text = "queues: " + ", ".join(parts)
        if self.unacked is not None:
            text += f"; {self.unacked} delivered, not acked"
        if self.dead is not None:
            text += f"; {self.dead} dead-lettered by the broker"
        return text


def redis_depths(client: redis.Redis) -> QueueDepths:
    """Queue depths on a Redis broker, through `client`: every list (each queue and its
    priority lists) and the unacked hash in one round trip."""
    lists = {
        queue.value: [queue.value, *(f"{queue.value}{PRIORITY_SEPARATOR}{p}" for p in range(1, 10))]
        for queue in Queue
    }
    pipe = client.pipeline(transaction=False)
    for keys in lists.values():
        for key in keys:
            pipe.llen(key)
    pipe.hlen(UNACKED)
    *lengths, unacked = (int(n) for n in pipe.execute())
    waiting = {}
    for name, keys in lists.items():
        waiting[name], lengths = sum(lengths[: len(keys)]), lengths[len(keys) :]
    return QueueDepths(waiting, unacked)


def amqp_depths(connection: Connection) -> QueueDepths:
    """Queue depths on RabbitMQ: a passive `queue.declare` per queue answers its ready messages
    and its consumers, and creates nothing. A queue that does not exist yet (no worker has
    declared it) counts as empty."""
    waiting: dict[str, int] = {}
    consumers: dict[str, int] = {}
    dead = 0
    names = [*(q.value for q in Queue), topology.DEAD_LETTER_QUEUE]
    for name in names:
        # A passive declare of a missing queue closes its channel: one channel per queue.
        channel = connection.channel()  # type: ignore[no-untyped-call]
        try:
            _, count, consuming = channel.queue_declare(queue=name, passive=True)
        except connection.channel_errors:
            count = consuming = 0
        finally:
            with contextlib.suppress(*connection.connection_errors, *connection.channel_errors):
                channel.close()
        if name == topology.DEAD_LETTER_QUEUE:
            dead = int(count)
        else:
            waiting[name], consumers[name] = int(count), int(consuming)
    return QueueDepths(waiting, None, consumers, dead)


class BrokerInspector:
    """Reads queue depths from the broker for a long-lived process (the ops page, `/metrics`):
    on Redis one pooled client, on RabbitMQ one connection kept and opened again when lost.
    Every call is bounded by `timeout` seconds per round trip."""

    def __init__(self, settings: Settings, timeout: float = 0.5) -> None:
        self.settings = settings
        self.timeout = timeout
        self._lock = threading.Lock()
        self._redis: redis.Redis | None = None
        self._amqp: Connection | None = None

    def depths(self) -> QueueDepths:
        """Raises when the broker does not answer."""
        if self.settings.broker_kind is BrokerKind.REDIS:
            if self._redis is None:  # built on first use: a client connects lazily anyway
                self._redis = redis.Redis.from_url(
                    self.settings.broker,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                )
            return redis_depths(self._redis)
        with self._lock:  # a kombu connection is not for two threads at once
            try:
                if self._amqp is None:
                    self._amqp = amqp_connection(self.settings, self.timeout)
                return amqp_depths(self._amqp)
            except Exception:
                self.close_connection()
                raise

    def close_connection(self) -> None:
        if self._amqp is not None:
            with contextlib.suppress(Exception):
                self._amqp.release()  # type: ignore[no-untyped-call]
            self._amqp = None

    def close(self) -> None:
        with self._lock:
            self.close_connection()
        if self._redis is not None:
            self._redis.close()


def amqp_connection(settings: Settings, timeout: float) -> Connection:
    """A connected kombu connection to RabbitMQ, every round trip bounded by `timeout`."""
    connection = Connection(  # type: ignore[no-untyped-call]
        settings.broker,
        connect_timeout=timeout,
        transport_options={"read_timeout": timeout, "write_timeout": timeout},
    )
    try:
        connection.connect()  # type: ignore[no-untyped-call]
    except Exception:
        connection.release()  # type: ignore[no-untyped-call]
        raise
    return connection


def queue_lengths(settings: Settings, timeout: float = 1.0) -> QueueDepths:
    """The project's queues, as `python -m app status` prints them."""
    inspector = BrokerInspector(settings, timeout)
    try:
        return inspector.depths()
    finally:
        inspector.close()


def workers_seen(settings: Settings, timeout: float = 1.0) -> list[str]:
    """Names of the workers that answer a ping on the broker within `timeout` (on RabbitMQ
    through its pidbox exchange, on Redis through its fanout emulation)."""
    app = _app("chat-dualwrite-status", settings)
    app.conf.broker_connection_timeout = timeout
    try:
        replies = app.control.ping(timeout=timeout) or []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)
