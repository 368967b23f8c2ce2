"""The rollout phase in the database, its history, and what `table_only` needs.

- `dualwrite_phase`: one row, the phase every process acts on (read inside each mutation's
  transaction with `FOR SHARE`, so that a change waits for the mutations in flight), and the
  change in progress, if any. `DUALWRITE_PHASE` seeds it here; from then on it changes only
  through `python -m app phase set`.
- `dualwrite_phase_changes`: who changed it, when, from, to, forced or not.
- `dualwrite_shadow_mismatches`: shadow reads that differed (a gate for `read_table`).
- `copilot_chat_sync_state.next_seq` and `.active_stream_id`: in `table_only` the handlers write
  rows and keep the chat's head here, never on `copilot_chats`, whose row the reverse sync holds
  while it rewrites a transcript.
- The version triggers skip writes made by the reverse sync (a transaction-local setting,
  `dualwrite.reverse_sync`), which carry the rows' version themselves.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

from app.settings import Settings
from migrations import online

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

PHASES = ("jsonb_only", "dual_write", "verify_reads", "read_table", "table_only")

# In `table_only` the rows are the transcript and the JSONB only follows them: a write to it by
# anyone but the reverse sync (a script, a release that predates the phase) would be overwritten
# by the next reverse sync, so it is refused rather than acknowledged and lost.
BUMP_VERSION = """
CREATE OR REPLACE FUNCTION copilot_chats_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) = 'on' THEN
        RETURN NEW;  -- the reverse sync sets the version it copied
    END IF;
    IF (TG_OP = 'UPDATE' OR NEW.messages IS DISTINCT FROM '[]'::jsonb)
       AND (SELECT phase FROM dualwrite_phase) = 'table_only' THEN
        RAISE EXCEPTION 'copilot_chats.messages is read-only in phase table_only'
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = 'The rows of copilot_chat_messages are the transcript: write through '
                         'the service, or step the phase back to read_table first.';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.messages_version := OLD.messages_version + 1;
    ELSIF NEW.messages IS DISTINCT FROM '[]'::jsonb THEN
        NEW.messages_version := greatest(NEW.messages_version, 1);
    END IF;
    RETURN NEW;
END
$$
"""

MARK_WANTED = """
CREATE OR REPLACE FUNCTION copilot_chats_mark_wanted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) = 'on' THEN
        RETURN NULL;
    END IF;
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


def upgrade() -> None:
    seed = Settings().dualwrite_phase.value
    checks = ", ".join(f"'{p}'" for p in PHASES)
    op.execute(
        f"""
        CREATE TABLE IF NOT EXISTS dualwrite_phase (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            phase text NOT NULL CHECK (phase IN ({checks})),
            since timestamptz NOT NULL DEFAULT now(),
            pending text CHECK (pending IN ({checks})),
            pending_since timestamptz,
            contracted_at timestamptz
        )
        """
    )
    op.get_bind().execute(
        text("INSERT INTO dualwrite_phase (phase) VALUES (:phase) ON CONFLICT DO NOTHING"),
        {"phase": seed},
    )
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS dualwrite_phase_changes (
            id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            who text NOT NULL,
            from_phase text NOT NULL,
            to_phase text NOT NULL,
            forced boolean NOT NULL,
            note text
        )
        """
    )
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS dualwrite_shadow_mismatches (
            id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            chat_id uuid NOT NULL,
            detail text NOT NULL
        )
        """
    )
    op.execute(
        "CREATE INDEX IF NOT EXISTS dualwrite_shadow_mismatches_at_idx "
        "ON dualwrite_shadow_mismatches (at)"
    )
    # Chats a reconcile found merely behind under live traffic: lag, counted apart from drift.
    op.execute(
        "ALTER TABLE dualwrite_reconcile_runs "
        "ADD COLUMN IF NOT EXISTS chats_behind int NOT NULL DEFAULT 0"
    )
    # Every write to a chat writes its sync state (the version trigger), so the DDL on that
    # table, and on the chats' trigger functions, runs online: each step committed on its own
    # under `lock_timeout`, retried while its lock is not granted. A rerun after a kill finds
    # what was done (every statement here is idempotent).
    with online.revision_steps() as step:
        # Nullable, no default: a catalog-only change.
        step(
            "add the table_only head to copilot_chat_sync_state",
            "ALTER TABLE copilot_chat_sync_state ADD COLUMN IF NOT EXISTS next_seq int, "
            "ADD COLUMN IF NOT EXISTS active_stream_id text",
        )
        step("the version triggers know the phase", BUMP_VERSION, MARK_WANTED)


def downgrade() -> None:
    op.execute("ALTER TABLE dualwrite_reconcile_runs DROP COLUMN chats_behind")
    op.execute(
        "ALTER TABLE copilot_chat_sync_state DROP COLUMN IF EXISTS active_stream_id, "
        "DROP COLUMN IF EXISTS next_seq"
    )
    op.execute("DROP TABLE dualwrite_shadow_mismatches")
    op.execute("DROP TABLE dualwrite_phase_changes")
    op.execute("DROP TABLE dualwrite_phase")
