"""Operators can pause the scheduled bulk passes: `dualwrite_bulk_paused`.

One row per paused pass (`reconcile-nightly`, `reconcile-recent`), with who paused it and when.
The scheduled task reads it at its start and skips its run, with a log line, while its pass is
paused; `python -m app bulk pause|resume` and the rollout page write it, `status` shows it. A new
table that nothing reads yet: no lock on a busy table.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-14
"""

from __future__ import annotations

from migrations import online

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BULK_PAUSED = """
CREATE TABLE IF NOT EXISTS dualwrite_bulk_paused (
    pass text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now(),
    paused_by text NOT NULL
)
"""


def upgrade() -> None:
    with online.revision_steps() as step:
        step("create dualwrite_bulk_paused", BULK_PAUSED)


def downgrade() -> None:
    with online.revision_steps() as step:
        step("drop dualwrite_bulk_paused", "DROP TABLE IF EXISTS dualwrite_bulk_paused")
