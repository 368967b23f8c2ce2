"""Publishing to the broker with a hard time bound (for handlers, the sweep and replays)."""

from __future__ import annotations

import contextlib

import redis
from celery import Celery

from app.jobs import Job, UnsafePublish
from app.settings import Settings


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


def bounded_publisher(settings: Settings) -> UnsafePublish:
    """A publish that gives up after the connect and socket timeouts and at most
    `publish_max_retries` quick retries. It raises on failure: callers go through
    `app.jobs.publish_after_commit`, which counts and logs instead.

    A job with a coalesce key is sent only if no job with that key is waiting: one `SET NX` on
    the broker's Redis decides. The marker expires, so a task lost with its marker still set
    delays nothing beyond the sweep.
    """
    app = producer(settings)
    markers = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.publish_connect_timeout_seconds,
        socket_timeout=settings.publish_socket_timeout_seconds,
    )
    policy = {
        "max_retries": settings.publish_max_retries,
        "interval_start": 0,
        "interval_step": settings.publish_retry_interval_seconds,
        "interval_max": settings.publish_retry_interval_seconds,
    }

    def publish_unsafe(job: Job) -> bool:
        if job.coalesce_key is not None and not markers.set(
            pending_key(job.coalesce_key), 1, nx=True, ex=settings.coalesce_ttl_seconds
        ):
            return False
        try:
            app.send_task(job.task, args=job.args, retry=True, retry_policy=policy)
        except Exception:
            # Without this, the marker would hold back every later change of the chat as
            # "coalesced" until it expires, hiding the failure.
            if job.coalesce_key is not None:
                with contextlib.suppress(redis.RedisError):
                    markers.delete(pending_key(job.coalesce_key))
            raise
        return True

    return publish_unsafe
