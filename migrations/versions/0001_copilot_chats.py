"""The pre-existing schema: chats with their whole transcript in a JSONB array.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS copilot_chats (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id text NOT NULL,
            workflow_id text,
            title text,
            model text NOT NULL,
            messages jsonb NOT NULL DEFAULT '[]'::jsonb,
            active_stream_id text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        "CREATE INDEX IF NOT EXISTS copilot_chats_user_id_idx "
        "ON copilot_chats (user_id, updated_at)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE copilot_chats")
