"""Bench-only Celery task: the bare round trip the lag bench compares the real sync with.

`bench.touch` upserts one row and does nothing else: no JSONB read, no advisory lock, no Redis
bookkeeping. Loaded only by bench workers (`celery -A tasks worker --include bench.tasks`), it
runs on the sync queue, in the same worker processes and with the same engine as the real sync.
"""

from __future__ import annotations

from sqlalchemy import text

from tasks import celery
from tasks.queues import Queue
from tasks.runtime import worker_transaction

TOUCH = "bench.touch"

# `done_at` is `now()`, the start of the task's transaction: the same clock the real sync's
# `updated_at` comes from, so the two lags are measured alike.
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_touch (
    id int PRIMARY KEY,
    sent_at timestamptz NOT NULL,
    done_at timestamptz NOT NULL
)
"""

_UPSERT = text(
    """
    INSERT INTO bench_touch (id, sent_at, done_at)
    VALUES (:id, CAST(:sent_at AS timestamptz), now())
    ON CONFLICT (id) DO UPDATE SET sent_at = EXCLUDED.sent_at, done_at = now()
    """
)


@celery.task(name=TOUCH, queue=Queue.SYNC.value, ignore_result=True, max_retries=0)
def touch(row_id: int, sent_at: str) -> None:
    """One upsert of one row, in one transaction."""
    with worker_transaction() as session:
        session.execute(_UPSERT, {"id": row_id, "sent_at": sent_at})
