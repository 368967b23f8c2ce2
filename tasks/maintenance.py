"""Periodic tasks: the sweep that re-enqueues chats whose copy is behind."""

from __future__ import annotations

import logging
from datetime import timedelta

from app.jobs import SYNC_CHAT, JobQueue, publish_after_commit
from app.services import sync
from app.settings import Phase, get_settings
from tasks import celery
from tasks.publish import bounded_publisher
from tasks.queues import Queue
from tasks.runtime import worker_transaction

log = logging.getLogger(__name__)

SWEEP = "chats.sweep"


@celery.task(name=SWEEP, queue=Queue.MAINTENANCE.value, ignore_result=True, max_retries=0)
def sweep() -> int:
    """Enqueue a whole-chat sync for every chat behind for longer than the grace period."""
    settings = get_settings()
    if settings.dualwrite_phase is Phase.JSONB_ONLY:
        return 0
    jobs = JobQueue()
    with worker_transaction() as session:
        behind = sync.sweep(
            session,
            grace=timedelta(seconds=settings.sweep_grace_seconds),
            limit=settings.sweep_batch_size,
        )
        for chat in behind:
            jobs.enqueue(SYNC_CHAT, str(chat.chat_id), chat.wanted_version)
    failed = publish_after_commit(jobs, bounded_publisher(settings))
    if behind:
        log.info("sweep: %d chats behind, %d enqueued", len(behind), len(behind) - failed)
    return len(behind)
