"""Expand, online: `messages_version` and its trigger, `copilot_chat_messages`, the backfill.

Nothing here holds a lock that blocks the application for more than a moment:

1. each DDL step that touches `copilot_chats` (a column added with a constant default, two
   tables whose foreign keys reference it, the version trigger) runs in its own short
   transaction under `lock_timeout`, retried with backoff while the lock is not granted;
2. then the backfill copies the chats in keyset batches, each its own transaction, resumable
   (`migrations/backfill.py`); with `BACKFILL_ON_WORKERS=true` it only records its start, and
   revision 0010 leaves the copy to the workers as chunks (`app/services/bulk_passes.py`).

From step 1 on, a trigger bumps `messages_version` and records it as the chat's wanted version
whenever `messages` changes, whoever writes it (this service, its previous release during a
rolling deploy, a script): no writer can skip the sweep. Every step is idempotent, so
`alembic upgrade head` after a kill picks up where it stopped.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

from app.settings import Settings
from migrations import backfill, online

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Parses a message `timestamp` without ever raising: anything but a string that PostgreSQL reads
# as a timestamp gives NULL. The cheap pattern test keeps the exception block (a subtransaction)
# off the path of values that are plainly not dates.
PARSE_TIMESTAMP = r"""
CREATE OR REPLACE FUNCTION copilot_message_timestamp(value jsonb) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    IF jsonb_typeof(value) IS DISTINCT FROM 'string'
       OR (value #>> '{}') !~ '^\s*\d{4}-\d{2}-\d{2}' THEN
        RETURN NULL;
    END IF;
    RETURN (value #>> '{}')::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$
"""

MESSAGES_TABLE = """
CREATE TABLE IF NOT EXISTS copilot_chat_messages (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    chat_id uuid NOT NULL REFERENCES copilot_chats (id) ON DELETE CASCADE,
    message_id text NOT NULL,
    role text NOT NULL,
    seq int NOT NULL,
    content jsonb NOT NULL,
    stream_id text,
    model text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz,
    source_version bigint NOT NULL,
    CONSTRAINT copilot_chat_messages_chat_message_key UNIQUE (chat_id, message_id)
)
"""

# The indexes of new, empty tables: instant, so they share the table's short transaction.
MESSAGES_INDEXES = [
    "CREATE INDEX IF NOT EXISTS copilot_chat_messages_created_idx "
    "ON copilot_chat_messages (chat_id, created_at, id) WHERE deleted_at IS NULL",
    "CREATE INDEX IF NOT EXISTS copilot_chat_messages_stream_idx "
    "ON copilot_chat_messages (chat_id, stream_id) WHERE stream_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS copilot_chat_messages_seq_idx "
    "ON copilot_chat_messages (chat_id, seq) WHERE deleted_at IS NULL",
]

SYNC_STATE_TABLE = """
CREATE TABLE IF NOT EXISTS copilot_chat_sync_state (
    chat_id uuid PRIMARY KEY REFERENCES copilot_chats (id) ON DELETE CASCADE,
    wanted_version bigint NOT NULL,
    applied_version bigint NOT NULL,
    dirty_since timestamptz,
    synced_at timestamptz
)
"""

SYNC_STATE_INDEX = (
    "CREATE INDEX IF NOT EXISTS copilot_chat_sync_state_behind_idx "
    "ON copilot_chat_sync_state (dirty_since) WHERE applied_version < wanted_version"
)

# A metadata-only change since PostgreSQL 11 (constant default): no table rewrite.
VERSION_COLUMN = (
    "ALTER TABLE copilot_chats ADD COLUMN IF NOT EXISTS messages_version bigint NOT NULL DEFAULT 0"
)

# Before the row is written: every change of `messages` is a new version. `UPDATE OF messages`
# fires whenever a statement sets the column, changed or not: a spurious version only costs a
# sync that finds nothing to do, while comparing two whole transcripts would cost every write.
BUMP_VERSION = """
CREATE OR REPLACE FUNCTION copilot_chats_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        NEW.messages_version := OLD.messages_version + 1;
    ELSIF NEW.messages IS DISTINCT FROM '[]'::jsonb THEN
        -- Version 0 is the empty transcript every chat starts with: nothing to copy.
        NEW.messages_version := greatest(NEW.messages_version, 1);
    END IF;
    RETURN NEW;
END
$$
"""

# After the row is written (the sync state's foreign key needs it): the chat wants its new
# version copied. A chat that was in sync becomes dirty now; the sweep's age counts from here.
MARK_WANTED = """
CREATE OR REPLACE FUNCTION copilot_chats_mark_wanted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO copilot_chat_sync_state AS s
        (chat_id, wanted_version, applied_version, dirty_since)
    VALUES (NEW.id, NEW.messages_version,
            CASE WHEN NEW.messages_version = 0 THEN 0 ELSE -1 END, now())
    ON CONFLICT (chat_id) DO UPDATE SET
        wanted_version = greatest(s.wanted_version, EXCLUDED.wanted_version),
        dirty_since = CASE WHEN s.applied_version >= s.wanted_version
                           THEN now() ELSE s.dirty_since END;
    RETURN NULL;
END
$$
"""

TRIGGERS = [
    "CREATE OR REPLACE TRIGGER copilot_chats_bump_version "
    "BEFORE INSERT OR UPDATE OF messages ON copilot_chats "
    "FOR EACH ROW EXECUTE FUNCTION copilot_chats_bump_version()",
    "CREATE OR REPLACE TRIGGER copilot_chats_mark_wanted "
    "AFTER INSERT OR UPDATE OF messages ON copilot_chats "
    "FOR EACH ROW EXECUTE FUNCTION copilot_chats_mark_wanted()",
]


def upgrade() -> None:
    settings = Settings()
    with online.revision_steps() as step:
        step("functions", PARSE_TIMESTAMP, BUMP_VERSION, MARK_WANTED)
        step("add copilot_chats.messages_version", VERSION_COLUMN)
        step("create copilot_chat_messages", MESSAGES_TABLE, *MESSAGES_INDEXES)
        step("create copilot_chat_sync_state", SYNC_STATE_TABLE, SYNC_STATE_INDEX)
        step("create the version triggers", *TRIGGERS)
        step("create dualwrite_backfill", backfill.STATE_TABLE)
        if settings.backfill_on_workers:
            # The copy's work is fixed now (the chats that exist); revision 0010 records it as
            # chunks for the workers, and the upgrade returns without copying.
            backfill.start(op.get_bind().engine)
            return
        backfill.run(
            op.get_bind().engine,
            backfill.Config(
                batch_size=settings.backfill_batch_size,
                max_batch_size=settings.backfill_max_batch_size,
                batch_seconds=settings.backfill_batch_seconds,
                pause_seconds=settings.backfill_pause_seconds,
                lock_timeout_ms=settings.migration_lock_timeout_ms,
                log_interval_seconds=settings.backfill_log_interval_seconds,
            ),
        )


def downgrade() -> None:
    with online.revision_steps() as step:
        step(
            "drop the expand",
            "DROP TRIGGER IF EXISTS copilot_chats_mark_wanted ON copilot_chats",
            "DROP TRIGGER IF EXISTS copilot_chats_bump_version ON copilot_chats",
            "DROP TABLE IF EXISTS dualwrite_backfill",
            "DROP TABLE IF EXISTS copilot_chat_sync_state",
            "DROP TABLE IF EXISTS copilot_chat_messages",
            "DROP FUNCTION IF EXISTS copilot_chats_mark_wanted()",
            "DROP FUNCTION IF EXISTS copilot_chats_bump_version()",
            "DROP FUNCTION IF EXISTS copilot_message_timestamp(jsonb)",
            "ALTER TABLE copilot_chats DROP COLUMN IF EXISTS messages_version",
        )
