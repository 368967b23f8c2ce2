"""Deferred work: tasks recorded during a unit of work and published only after its commit.

A handler never talks to the broker inside a database transaction. It records its jobs on the
unit of work; once the commit is durable the boundary hands them to the process's background
publisher (`app.publisher`), which sends them off the request's path. A job that cannot be sent
is logged and counted, never raised: the sweep finds the chat through its sync state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app import metrics
from app.task_names import SYNC_CHAT as SYNC_CHAT
from app.task_names import SYNC_MESSAGES as SYNC_MESSAGES

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    task: str
    args: tuple[Any, ...]
    # The chat whose queued mark this job holds (`copilot_chat_sync_state.queued_since`, set by
    # the statement that recorded the job): released if the job cannot be sent, so that the
    # chat's next write sends one again.
    queued: str | None = None
    # Seconds the broker holds the task before a worker runs it (`send_task(countdown=...)`).
    # Keep it well below the broker's visibility timeout: a worker holds a delayed task unacked
    # until it is due, and one held past the timeout is delivered a second time.
    countdown: float | None = None


# Sends one job to the broker. May block up to the broker's timeouts and may raise: unsafe to
# call inside a transaction or without catching; `publish_after_commit` (the CLI's) is the only
# caller.
UnsafePublish = Callable[[Job], None]

# Sends many jobs at once: one outcome per job, in order: None if sent, else the exception that
# kept it from being sent. Unsafe like `UnsafePublish`; `publish_many_after_commit` (the
# sweep's) and `app.publisher.BackgroundPublisher` (the API's) are the only callers.
UnsafePublishMany = Callable[[Sequence[Job]], Sequence[Exception | None]]


@dataclass(frozen=True, slots=True)
class Published:
    """What became of the jobs of one bulk publish."""

    sent: int = 0
    failed: int = 0


@dataclass(slots=True)
class JobQueue:
    """The jobs of one unit of work; dropped on rollback, published after commit."""

    enabled: bool = True
    jobs: list[Job] = field(default_factory=list)
    # The countdown of jobs enqueued without one of their own (set from the phase).
    delay: float | None = None

    def enqueue(
        self,
        task: str,
        *args: Any,
        queued: str | None = None,
        countdown: float | None = None,
    ) -> None:
        if self.enabled:
            wait = countdown if countdown is not None else self.delay
            self.jobs.append(Job(task, args, queued, wait))

    def clear(self) -> None:
        self.jobs.clear()


def publish_after_commit(queue: JobQueue, publish_unsafe: UnsafePublish) -> int:
    """Publish every recorded job; returns how many failed. Never raises."""
    failures = 0
    started = time.perf_counter()
    for job in queue.jobs:
        try:
            publish_unsafe(job)
        except Exception as exc:  # any broker failure: the sweep repairs the chat
            failures += 1
            metrics.ENQUEUE_FAILURES.labels(job.task).inc()
            log.warning("enqueue of %s%r failed: %s", job.task, job.args, exc)
        else:
            metrics.ENQUEUED.labels(job.task).inc()
    if queue.jobs:
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
    queue.clear()
    return failures


def publish_many_after_commit(queue: JobQueue, publish_many: UnsafePublishMany) -> Published:
    """Publish every recorded job in one bulk call; never raises. Failures are counted per job
    but logged once, with the first error: a sweep of thousands of chats against a broker that
    is down must not write thousands of lines."""
    jobs = list(queue.jobs)
    queue.clear()
    if not jobs:
        return Published()
    try:
        outcomes: list[Exception | None] = list(publish_many(jobs))
    except Exception as exc:  # any broker failure: the next sweep tries again
        outcomes = [exc] * len(jobs)
    published, first_error = count_outcomes(jobs, outcomes)
    if first_error is not None:
        job, error = first_error
        log.warning(
            "enqueue of %d of %d jobs failed; the first, %s%r: %s",
            published.failed,
            len(jobs),
            job.task,
            job.args,
            error,
        )
    return published


def count_outcomes(
    jobs: Sequence[Job], outcomes: Sequence[Exception | None]
) -> tuple[Published, tuple[Job, Exception] | None]:
    """Count each job's outcome in the publish metrics; returns the totals and the first
    failure, for the caller to log as it sees fit."""
    sent = failed = 0
    first_error: tuple[Job, Exception] | None = None
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome is None:
            sent += 1
            metrics.ENQUEUED.labels(job.task).inc()
        else:
            failed += 1
            metrics.ENQUEUE_FAILURES.labels(job.task).inc()
            first_error = first_error or (job, outcome)
    return Published(sent=sent, failed=failed), first_error
