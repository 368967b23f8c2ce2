"""Coalescing in the database: `copilot_chat_sync_state.queued_since`.

Set by the statement of a write that sends a sync of its chat (when no sync waits yet), by the
sweep when it sends one, and by a retry while it waits for its countdown; cleared by the task
as it starts, before it reads the chat. A write that finds it set sends nothing: the waiting
sync will read the write. One set longer ago than `COALESCE_TTL_SECONDS` (a task lost with its
worker) no longer holds the chat back from the sweep.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

from migrations import online

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every write to a chat writes its sync state: the DDL waits for its lock no longer than
    # `lock_timeout`, and is retried. Nullable, no default: a catalog-only change.
    with online.revision_steps() as step:
        step(
            "add queued_since to copilot_chat_sync_state",
            "ALTER TABLE copilot_chat_sync_state ADD COLUMN IF NOT EXISTS queued_since timestamptz",
        )


def downgrade() -> None:
    op.execute("ALTER TABLE copilot_chat_sync_state DROP COLUMN IF EXISTS queued_since")
