"""Publishing to the broker with a hard time bound (for handlers, the sweep and replays)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from app.jobs import Job
from app.settings import Settings, get_settings


def producer(settings: Settings) -> Celery:
    """A Celery app that only sends, to the broker and with the timeouts of these settings."""
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
    callers go through `app.jobs.publish_after_commit` / `publish_many_after_commit`, which count
    and log instead.

    A job with a coalesce key is sent only if no job with that key is waiting: one `SET NX` on
    the broker's Redis decides. The marker expires after `coalesce_ttl_seconds`, so a task lost
    with its marker still set holds its chat back no longer than that: the sweep sends it again.

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
        """Send one job (a handler's); True if sent, False if coalesced. Raises on failure."""
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
                        ex=self.settings.coalesce_ttl_seconds,
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


_shared: dict[int, BoundedPublisher] = {}


def process_publisher() -> BoundedPublisher:
    """This process's publisher (the sweep's), built on first use and kept: its producer and its
    Redis client are reused by every later sweep. Never shared across a fork."""
    pid = os.getpid()
    if pid not in _shared:
        _shared[pid] = BoundedPublisher(get_settings())
    return _shared[pid]
