"""`copilot_message_timestamp` is PARALLEL UNSAFE, as its EXCEPTION block requires.

Revision 0002 declared it PARALLEL SAFE, but a PL/pgSQL block with an EXCEPTION clause starts a
subtransaction at each entry, which PostgreSQL refuses inside a parallel operation ("cannot
start subtransactions during a parallel operation"). Any statement whose plan the planner made
parallel (a large reconcile's comparison, an operator's query over the table) and that called
the function failed outright. Declared unsafe, such statements are planned serially. A change of
the function's catalog row: no lock on any table.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-22
"""

from __future__ import annotations

from migrations import online

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with online.revision_steps() as step:
        step(
            "copilot_message_timestamp is parallel unsafe",
            "ALTER FUNCTION copilot_message_timestamp(jsonb) PARALLEL UNSAFE",
        )


def downgrade() -> None:
    with online.revision_steps() as step:
        step(
            "copilot_message_timestamp as revision 0002 declared it",
            "ALTER FUNCTION copilot_message_timestamp(jsonb) PARALLEL SAFE",
        )
