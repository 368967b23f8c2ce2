"""The bulk passes on the worker fleet: `dualwrite_bulk_passes` and `dualwrite_bulk_chunks`.

A pass (the backfill, or a rolling full reconcile) is a row with a state machine (active, paused,
finished, failed), split into chunks over keyset ranges of chat ids that any worker runs
(`app/services/bulk_passes.py`), in the manner of GitLab's batched background migrations. Two new
tables that nothing reads yet: no lock on a busy table.

With `BACKFILL_ON_WORKERS=true`, revision 0002 leaves the copy to this revision, which records it
as a pass with its chunks and tries to queue the first ones: the upgrade returns in seconds, and
the workers copy. Without it, 0002 has copied everything already and nothing is recorded here.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-21
"""

from __future__ import annotations

from alembic import op

from app.settings import Settings
from migrations import online

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

PASSES = """
CREATE TABLE IF NOT EXISTS dualwrite_bulk_passes (
    id bigserial PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('backfill', 'reconcile')),
    state text NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'paused', 'finished', 'failed')),
    -- The backfill's work is the chats that existed at this time (later ones are the sweep's).
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    total_chats bigint NOT NULL,
    total_chunks int NOT NULL,
    -- Chunks the dispatcher may queue: all of a backfill, a night's share of a rolling reconcile.
    released_chunks int NOT NULL,
    nights int NOT NULL DEFAULT 1,
    trigger text NOT NULL DEFAULT 'migration'
)
"""

CHUNKS = """
CREATE TABLE IF NOT EXISTS dualwrite_bulk_chunks (
    id bigserial PRIMARY KEY,
    pass_id bigint NOT NULL REFERENCES dualwrite_bulk_passes (id) ON DELETE CASCADE,
    ordinal int NOT NULL,
    -- The chats with lo < id <= hi; a null bound is open.
    lo uuid,
    hi uuid,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'queued', 'running', 'done', 'failed')),
    -- The last chat done: a chunk taken again resumes after it.
    cursor uuid,
    attempts int NOT NULL DEFAULT 0,
    chats bigint NOT NULL DEFAULT 0,
    rows bigint NOT NULL DEFAULT 0,
    bad_elements bigint NOT NULL DEFAULT 0,
    bad_chats bigint NOT NULL DEFAULT 0,
    inserted bigint NOT NULL DEFAULT 0,
    updated bigint NOT NULL DEFAULT 0,
    soft_deleted bigint NOT NULL DEFAULT 0,
    behind bigint NOT NULL DEFAULT 0,
    timed_out bigint NOT NULL DEFAULT 0,
    skipped bigint NOT NULL DEFAULT 0,
    queued_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    seconds double precision NOT NULL DEFAULT 0,
    worker text,
    error text,
    UNIQUE (pass_id, ordinal)
)
"""

IN_FLIGHT = (
    "CREATE INDEX IF NOT EXISTS dualwrite_bulk_chunks_in_flight_idx "
    "ON dualwrite_bulk_chunks (state, pass_id, ordinal) "
    "WHERE state IN ('pending', 'queued', 'running')"
)


def upgrade() -> None:
    with online.revision_steps() as step:
        step("create dualwrite_bulk_passes", PASSES)
        step("create dualwrite_bulk_chunks", CHUNKS, IN_FLIGHT)
        if Settings().backfill_on_workers:
            from app.services import bulk_passes

            bulk_passes.start_backfill_from_migration(op.get_bind().engine)


def downgrade() -> None:
    with online.revision_steps() as step:
        step(
            "drop the bulk passes",
            "DROP TABLE IF EXISTS dualwrite_bulk_chunks",
            "DROP TABLE IF EXISTS dualwrite_bulk_passes",
        )
