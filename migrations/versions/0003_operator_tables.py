"""Operator tables: dead letters and reconcile runs; an index for time-windowed reconciles.

Idempotent: the index is built outside the revision's transaction, so a kill during its build
leaves the tables in place and the revision unrecorded.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One open record per chat and reason; attempts and last_seen grow while it stays open.
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS dualwrite_dead_letters (
            id bigserial PRIMARY KEY,
            task text NOT NULL,
            chat_id uuid NOT NULL,
            args jsonb NOT NULL,
            reason text NOT NULL,
            error text NOT NULL,
            attempts int NOT NULL DEFAULT 1,
            first_seen timestamptz NOT NULL DEFAULT now(),
            last_seen timestamptz NOT NULL DEFAULT now(),
            replayed_at timestamptz,
            resolved_at timestamptz
        )
        """
    )
    op.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS dualwrite_dead_letters_open_key "
        "ON dualwrite_dead_letters (chat_id, reason) WHERE resolved_at IS NULL"
    )
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS dualwrite_reconcile_runs (
            id bigserial PRIMARY KEY,
            started_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            since interval,
            dry_run boolean NOT NULL,
            trigger text NOT NULL,
            outcome text NOT NULL DEFAULT 'running',
            chats_scanned int NOT NULL DEFAULT 0,
            messages_scanned bigint NOT NULL DEFAULT 0,
            bad_elements bigint NOT NULL DEFAULT 0,
            inserted bigint NOT NULL DEFAULT 0,
            updated bigint NOT NULL DEFAULT 0,
            soft_deleted bigint NOT NULL DEFAULT 0,
            drift bigint NOT NULL DEFAULT 0,
            duration_seconds double precision,
            error text
        )
        """
    )
    # CONCURRENTLY: the chats table takes writes while this index builds. The tables above are
    # committed before it (that is what the autocommit block does), and the revision is recorded
    # only after it, so everything here must survive being run again after a kill; a build
    # killed half-way leaves an invalid index, dropped and built again.
    with op.get_context().autocommit_block():
        invalid = (
            op.get_bind()
            .execute(
                text(
                    "SELECT 1 FROM pg_index WHERE NOT indisvalid "
                    "AND indexrelid = to_regclass('copilot_chats_updated_at_idx')"
                )
            )
            .first()
        )
        if invalid:
            op.execute("DROP INDEX CONCURRENTLY IF EXISTS copilot_chats_updated_at_idx")
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS copilot_chats_updated_at_idx "
            "ON copilot_chats (updated_at)"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS copilot_chats_updated_at_idx")
    op.execute("DROP TABLE dualwrite_reconcile_runs")
    op.execute("DROP TABLE dualwrite_dead_letters")
