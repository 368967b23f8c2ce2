"""The broker as the API and the CLI see it: a send-only Celery producer with hard time bounds,
the bounded publisher, and what the broker says about its queues and
workers. Nothing here imports `tasks/`: a producer needs the task names, not the tasks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Celery

from app.jobs import Job
from app.settings import Settings
from app.task_names import Queue

log = logging.getLogger(__name__)


def producer(settings: Settings) -> Celery:
    """A Celery app that only sends, to the broker and with the timeouts of these settings.

    It shares `celeryconfig.py` with the workers (serializer, queues, routes), and registers no
    task: `send_task` names the task."""
    app = Celery("chat-dualwrite-producer", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.redis_url
    app.conf.broker_connection_timeout = settings.publish_connect_timeout_seconds
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "socket_connect_timeout": settings.publish_connect_timeout_seconds,
        "socket_timeout": settings.publish_socket_timeout_seconds,
    }
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
                        countdown=job.countdown,
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


def queue_lengths(settings: Settings) -> tuple[dict[str, int], int]:
    """Messages waiting per queue, and messages delivered to a worker but not acked yet."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=1)
    try:
        waiting = {}
        for queue in Queue:
            keys = [queue.value, *(f"{queue.value}{PRIORITY_SEPARATOR}{p}" for p in range(1, 10))]
            waiting[queue.value] = sum(int(client.llen(key)) for key in keys)
        return waiting, int(client.hlen(UNACKED))
    finally:
        client.close()


def workers_seen(settings: Settings, timeout: float = 1.0) -> list[str]:
    """Names of the workers that answer a ping on the broker within `timeout`."""
    app = Celery("chat-dualwrite-status", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.redis_url
    try:
        replies = app.control.ping(timeout=timeout) or []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)
