"""Periodic tasks: the sweep (chats whose copy is behind), the reconcile (drift), and the bulk
passes' chunks and their dispatch (`app/services/bulk_passes.py`)."""

from __future__ import annotations

import logging
from datetime import timedelta

from app.jobs import JobQueue, publish_many_after_commit
from app.repositories import bulk_paused
from app.services import bulk_passes, sync
from app.services import reconcile as reconcile_service
from app.settings import get_settings
from app.task_names import (
    BACKFILL_CHUNK,
    DISPATCH_CHUNKS,
    RECONCILE,
    RECONCILE_CHUNK,
    SWEEP,
    SYNC_CHAT,
    Queue,
)
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
def reconcile(since_seconds: float | None = None, rolling: bool = False) -> int | None:
    """Compare JSONB and table and repair drift; all chats, or those changed in the window.
    With `rolling` (beat's nightly run), only start the night's share of the rolling full
    pass: its chunks run as `chats.reconcile_chunk` on any maintenance worker.
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
    if rolling:
        with worker_transaction() as session:
            pass_id, released, total = bulk_passes.start_night(session, settings, trigger="beat")
        log.info(
            "reconcile: rolling pass #%d: %d of %d chunks released (RECONCILE_FULL_DAYS=%d)",
            pass_id,
            released,
            total,
            settings.reconcile_full_days,
        )
        _dispatch()
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


def _dispatch() -> int:
    return bulk_passes.dispatch_and_publish(
        worker_sessionmaker(), get_settings(), process_publisher().many
    )


@celery.task(
    name=DISPATCH_CHUNKS,
    queue=Queue.MAINTENANCE.value,
    ignore_result=True,
    max_retries=0,
    expires=get_settings().bulk_dispatch_interval_seconds,
)
def dispatch_chunks() -> int:
    """Beat's tick of the bulk passes: take back chunks lost with a worker or a task, and queue
    chunks up to `BULK_MAX_CONCURRENT_CHUNKS` in flight across the fleet."""
    return _dispatch()


# A chunk yields after BULK_CHUNK_SECONDS (between batches); the limits leave a batch room to end.
_CHUNK_LIMITS = {
    "soft_time_limit": int(get_settings().bulk_chunk_seconds * 2 + 60),
    "time_limit": int(get_settings().bulk_chunk_seconds * 2 + 120),
}


def _chunk(kind: str, pass_id: int, ordinal: int, lo: str | None, hi: str | None) -> str:
    """Run one chunk, then dispatch the next ones (the pass moves on without waiting for beat).
    `lo` and `hi` are for the reader (Flower, logs): the chunk's row holds its range."""
    outcome = bulk_passes.run_chunk(worker_sessionmaker(), get_settings(), pass_id, ordinal)
    log.info(
        "%s chunk %d of pass #%d (%s, %s]: %s, %d chats, %d rows in %.1fs",
        kind,
        ordinal,
        pass_id,
        lo or "-inf",
        hi or "+inf",
        outcome.state,
        outcome.chats,
        outcome.rows,
        outcome.seconds,
    )
    if outcome.state in ("done", "yielded"):
        _dispatch()
    return outcome.state


@celery.task(
    name=BACKFILL_CHUNK,
    queue=Queue.MAINTENANCE.value,
    ignore_result=True,
    max_retries=0,
    **_CHUNK_LIMITS,
)
def backfill_chunk(pass_id: int, ordinal: int, lo: str | None, hi: str | None) -> str:
    """Copy the chats lo < id <= hi of a fleet backfill (`BACKFILL_ON_WORKERS`)."""
    return _chunk("backfill", pass_id, ordinal, lo, hi)


@celery.task(
    name=RECONCILE_CHUNK,
    queue=Queue.MAINTENANCE.value,
    ignore_result=True,
    max_retries=0,
    **_CHUNK_LIMITS,
)
def reconcile_chunk(pass_id: int, ordinal: int, lo: str | None, hi: str | None) -> str:
    """Compare and repair the chats lo < id <= hi of a rolling full reconcile pass."""
    return _chunk("reconcile", pass_id, ordinal, lo, hi)
