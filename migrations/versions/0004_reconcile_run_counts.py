"""Reconcile runs count the chats they gave up on (a lock or statement timeout) and skipped.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Constant defaults: a catalog-only change, no rewrite of the (small) operator table.
    op.execute(
        "ALTER TABLE dualwrite_reconcile_runs "
        "ADD COLUMN chats_timed_out int NOT NULL DEFAULT 0, "
        "ADD COLUMN chats_skipped int NOT NULL DEFAULT 0"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE dualwrite_reconcile_runs "
        "DROP COLUMN chats_skipped, DROP COLUMN chats_timed_out"
    )
