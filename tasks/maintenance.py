"""Periodic tasks: the sweep (chats whose copy is behind) and the reconcile (drift)."""

from __future__ import annotations

import logging
from datetime import timedelta

from app.jobs import JobQueue, publish_many_after_commit
from app.repositories import bulk_paused
from app.services import reconcile as reconcile_service
from app.services import sync
from app.settings import get_settings
from app.task_names import RECONCILE, SWEEP, SYNC_CHAT, Queue
from tasks import celery
from tasks.publish import process_publisher
from tasks.runtime import worker_sessionmaker, worker_transaction

log = logging.getLogger(__name__)


@celery.task(name=SWEEP, queue=Queue.MAINTENANCE.value, ignore_result=True, max_retries=0)
def sweep() -> dict[str, int]:
    """Enqueue a whole-chat sync for every chat behind for longer than the grace period.

    A chat whose sync still waits in the queue (its queued mark is set) is not sent again every
    minute, so a backlog does not grow with every sweep; one whose mark is older than
    `COALESCE_TTL_SECONDS` (a task lost with its worker) is sent again. The sweep marks the
    chats it sends in the statement that finds them, and sends them all through one producer,
    kept by this process from one sweep to the next.
    """
    settings = get_settings()
    jobs = JobQueue()
    with worker_transaction() as session:
        due = sync.sweep(
            session,
            grace=timedelta(seconds=settings.sweep_grace_seconds),
            ttl=timedelta(seconds=settings.coalesce_ttl_seconds),
            limit=settings.sweep_batch_size,
        )
    for chat in due:
        if chat.send:
            key = str(chat.chat_id)
            jobs.enqueue(SYNC_CHAT, key, chat.wanted_version, queued=key)
    published = publish_many_after_commit(jobs, process_publisher().many)
    coalesced = len(due) - published.sent - published.failed
    if due:
        log.info(
            "sweep: %d chats behind, %d sent, %d coalesced (a sync already waits), %d failed",
            len(due),
            published.sent,
            coalesced,
            published.failed,
        )
    return {
        "behind": len(due),
        "sent": published.sent,
        "coalesced": coalesced,
        "failed": published.failed,
    }


@celery.task(
    name=RECONCILE,
    queue=Queue.MAINTENANCE.value,
    ignore_result=True,
    max_retries=0,
    # A reconcile outlasts the sync tasks' limits and the broker's visibility timeout; it is
    # acked when it starts, so it is never delivered twice: a run lost with its worker is
    # simply the next scheduled run's work.
    acks_late=False,
    soft_time_limit=get_settings().reconcile_time_limit_seconds,
    time_limit=get_settings().reconcile_time_limit_seconds + 60,
)
def reconcile(since_seconds: float | None = None) -> int | None:
    """Compare JSONB and table and repair drift; all chats, or those changed in the window.
    The advisory lock keeps it to one run at a time. Its batches run under the reconcile's own
    timeouts (`RECONCILE_*_TIMEOUT_MS`), not the worker's, set per transaction. A run whose pass
    an operator paused (`python -m app bulk pause`, the rollout page) does nothing."""
    settings = get_settings()
    since = timedelta(seconds=since_seconds) if since_seconds else None
    name = bulk_paused.Pass.RECONCILE_RECENT if since else bulk_paused.Pass.RECONCILE_NIGHTLY
    with worker_transaction() as session:
        paused = bulk_paused.is_paused(session, name)
    if paused is not None:
        log.info(
            "reconcile: skipped: %s is paused (by %s since %s UTC); "
            "`python -m app bulk resume %s` resumes it",
            name.value,
            paused.paused_by,
            f"{paused.paused_at:%Y-%m-%d %H:%M:%S}",
            name.value,
        )
        return None
    try:
        report = reconcile_service.reconcile(
            worker_sessionmaker(),
            since=since,
            batch_size=settings.reconcile_batch_size,
            trigger="beat",
        )
    except sync.WrongPhase as wrong:
        log.info("reconcile: nothing to do: %s", wrong)
        return None
    if report is None:
        log.info("reconcile: another run holds the lock; nothing done")
        return None
    log.info(
        "reconcile #%d: %s, %d chats, %d rows repaired, %d chats timed out (dead-lettered), "
        "%d skipped (worker lost) in %.1fs",
        report.run_id,
        report.outcome,
        report.chats,
        report.drift,
        report.timed_out,
        report.skipped,
        report.seconds,
    )
    return report.drift
