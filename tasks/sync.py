"""Sync tasks: copy a chat's JSONB into `copilot_chat_messages`. Thin wrappers over the service.

Arguments are keys only (chat id, message ids, version): the worker reads the JSONB when it runs,
so no message content sits in the broker and no delivery order can write old data.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Task

from app import metrics
from app.jobs import SYNC_CHAT, SYNC_MESSAGES
from app.retry import RetryPolicy
from app.services import sync
from app.settings import get_settings
from tasks import celery
from tasks.queues import Queue
from tasks.runtime import worker_transaction

log = logging.getLogger(__name__)

POLICY = RetryPolicy.from_settings(get_settings())


def _run(task: Task[Any, Any], chat_id: str, version: int) -> None:
    try:
        with worker_transaction() as session:
            report = sync.sync_chat(session, uuid.UUID(chat_id), version)
    except Exception as error:
        retries = task.request.retries
        if POLICY.should_retry(error, retries):
            metrics.TASKS.labels(task.name, "retry").inc()
            log.warning(
                "%s(%s, v%d) failed, retry %d: %s", task.name, chat_id, version, retries + 1, error
            )
            raise task.retry(exc=error, countdown=POLICY.countdown(retries)) from error
        metrics.TASKS.labels(task.name, "failed").inc()
        raise
    for lag in report.lag_seconds:
        metrics.SYNC_LAG.observe(lag)
    metrics.ROWS.labels("inserted").inc(report.inserted)
    metrics.ROWS.labels("updated").inc(report.updated)
    metrics.ROWS.labels("removed").inc(report.removed)
    outcome = "missing" if report.missing else "skipped" if report.skipped else "applied"
    metrics.TASKS.labels(task.name, outcome).inc()


@celery.task(
    name=SYNC_MESSAGES,
    bind=True,
    queue=Queue.SYNC.value,
    ignore_result=True,
    max_retries=POLICY.max_retries,
)
def sync_messages(self: Task[Any, Any], chat_id: str, message_ids: list[str], version: int) -> None:
    """Copy a chat after messages were appended. `message_ids` name them for operators; the
    whole chat is converged, so deliveries in any order end in the same rows."""
    _run(self, chat_id, version)


@celery.task(
    name=SYNC_CHAT,
    bind=True,
    queue=Queue.SYNC.value,
    ignore_result=True,
    max_retries=POLICY.max_retries,
)
def sync_chat(self: Task[Any, Any], chat_id: str, version: int) -> None:
    """Copy a whole chat (snapshot replace, fork, import, sweep)."""
    _run(self, chat_id, version)
