"""The broker as the API and the CLI see it: a send-only Celery producer with hard time bounds,
the bounded publisher that coalesces per chat, and what the broker says about its queues and
workers. Nothing here imports `tasks/`: a producer needs the task names, not the tasks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from app.jobs import Job
from app.settings import Settings
from app.task_names import Queue


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


def pending_key(coalesce_key: str) -> str:
    """Set while a coalescing job waits in the queue; its task deletes it when it starts."""
    return f"dualwrite:pending:{coalesce_key}"


class BoundedPublisher:
    """Publishes jobs and gives up after the connect and socket timeouts and at most
    `publish_max_retries` quick retries. It raises (or, in bulk, returns the error) on failure:
    callers go through `app.publisher.BackgroundPublisher` (the API),
    `app.jobs.publish_after_commit` or `publish_many_after_commit`, which count and log instead.

    A job with a coalesce key is sent only if no job with that key is waiting: one `SET NX` on
    the broker's Redis decides. The marker expires after `coalesce_ttl_seconds` (plus the job's
    countdown), so a task lost with its marker still set holds its chat back no longer than
    that: the sweep sends it again.

    Build one per process and keep it: it owns a producer app with its connection pool and a
    Redis client for the markers.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = producer(settings)
        self.markers = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.publish_connect_timeout_seconds,
            socket_timeout=settings.publish_socket_timeout_seconds,
        )
        self.policy: dict[str, Any] = {
            "max_retries": settings.publish_max_retries,
            "interval_start": 0,
            "interval_step": settings.publish_retry_interval_seconds,
            "interval_max": settings.publish_retry_interval_seconds,
        }

    def __call__(self, job: Job) -> bool:
        """Send one job; True if sent, False if coalesced. Raises on failure."""
        (outcome,) = self.many([job])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def many(self, jobs: Sequence[Job]) -> list[bool | Exception]:
        """Send jobs in bulk: one pipelined round trip sets every marker, then the sends share
        one producer and its connection. One outcome per job, in order (see
        `app.jobs.UnsafePublishMany`).

        The first failed send ends the batch: the broker is most likely unreachable, and each
        further send would wait out its own timeouts. The jobs not sent have their markers
        released, so that the next change or the next sweep sends them.
        """
        outcomes: list[bool | Exception] = [True] * len(jobs)
        keyed = [i for i, job in enumerate(jobs) if job.coalesce_key is not None]
        if keyed:
            try:
                pipe = self.markers.pipeline(transaction=False)
                for i in keyed:
                    pipe.set(
                        pending_key(str(jobs[i].coalesce_key)),
                        1,
                        nx=True,
                        # A delayed job waits in the broker: its marker must outlive the wait.
                        ex=self.settings.coalesce_ttl_seconds + math.ceil(jobs[i].countdown or 0),
                    )
                claimed = pipe.execute()
            except redis.RedisError as exc:
                for i in keyed:
                    outcomes[i] = exc
            else:
                for i, won in zip(keyed, claimed, strict=True):
                    # A key twice in one batch: the second finds the first's marker.
                    outcomes[i] = bool(won)
        todo = [i for i, outcome in enumerate(outcomes) if outcome is True]
        failed: Exception | None = None
        sent: set[int] = set()
        if todo:
            try:
                with self.app.producer_or_acquire() as connection:
                    for i in todo:
                        if failed is not None:
                            outcomes[i] = failed
                            continue
                        try:
                            self.app.send_task(
                                jobs[i].task,
                                args=jobs[i].args,
                                countdown=jobs[i].countdown,
                                producer=connection,
                                retry=True,
                                retry_policy=self.policy,
                                add_to_parent=False,
                            )
                        except Exception as exc:
                            failed = outcomes[i] = exc
                        else:
                            sent.add(i)
            except Exception as exc:  # acquiring (or releasing) the producer failed
                failed = exc
                for i in todo:
                    if i not in sent:
                        outcomes[i] = exc
        if failed is not None:
            self._release([jobs[i] for i in todo if isinstance(outcomes[i], Exception)])
        return outcomes

    def _release(self, jobs: Sequence[Job]) -> None:
        # Without this, a marker would hold back every later change of its chat as "coalesced"
        # until it expires, hiding the failure.
        keys = [pending_key(job.coalesce_key) for job in jobs if job.coalesce_key is not None]
        if keys:
            with contextlib.suppress(redis.RedisError):
                self.markers.delete(*keys)


def bounded_publisher(settings: Settings) -> BoundedPublisher:
    """A publisher with these settings' bounds (see `BoundedPublisher`)."""
    return BoundedPublisher(settings)


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
