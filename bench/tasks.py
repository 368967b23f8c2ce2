"""Bench-only Celery task `bench.touch`, the bare round trip bench.lag compares the real sync
with: one upsert of one row, nothing else, on the sync queue, in the same worker processes and
with the same engine. Loaded only by bench workers (`--include bench.tasks`)."""

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
    with worker_transaction() as session:
        session.execute(_UPSERT, {"id": row_id, "sent_at": sent_at})
