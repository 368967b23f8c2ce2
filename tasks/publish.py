"""Publishing to the broker with a hard time bound (for handlers, the sweep and replays)."""

from __future__ import annotations

from app.jobs import Job, UnsafePublish
from app.settings import Settings
from tasks import celery


def bounded_publisher(settings: Settings) -> UnsafePublish:
    """A publish that gives up after the connect and socket timeouts of `celeryconfig` and at
    most `publish_max_retries` quick retries. It raises on failure: callers go through
    `app.jobs.publish_after_commit`, which counts and logs instead."""
    policy = {
        "max_retries": settings.publish_max_retries,
        "interval_start": 0,
        "interval_step": settings.publish_retry_interval_seconds,
        "interval_max": settings.publish_retry_interval_seconds,
    }

    def publish_unsafe(job: Job) -> None:
        celery.send_task(job.task, args=job.args, retry=True, retry_policy=policy)

    return publish_unsafe
