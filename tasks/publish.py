"""Publishing to the broker with a hard time bound (for handlers, the sweep and replays)."""

from __future__ import annotations

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


def bounded_publisher(settings: Settings) -> UnsafePublish:
    """A publish that gives up after the connect and socket timeouts and at most
    `publish_max_retries` quick retries. It raises on failure: callers go through
    `app.jobs.publish_after_commit`, which counts and logs instead."""
    app = producer(settings)
    policy = {
        "max_retries": settings.publish_max_retries,
        "interval_start": 0,
        "interval_step": settings.publish_retry_interval_seconds,
        "interval_max": settings.publish_retry_interval_seconds,
    }

    def publish_unsafe(job: Job) -> None:
        app.send_task(job.task, args=job.args, retry=True, retry_policy=policy)

    return publish_unsafe
