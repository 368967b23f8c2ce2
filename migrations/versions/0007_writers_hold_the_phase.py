"""Every writer of the JSONB holds the rollout phase, not only this service's.

The version trigger used to read the phase with a plain `SELECT`: a writer that is not this
service (a script, the previous release) could pass it while a step into `table_only` held the
phase row, commit after the step, and have its write erased by the next reverse sync. Now a
statement that writes `copilot_chats.messages` first takes the phase row `FOR SHARE`, as the
service's own mutations do, before it locks any chat row:

- a step waits for such a writer in flight, and converges its write before it commits;
- a writer that comes during a step waits for it, then sees the new phase (and in `table_only`
  is refused).

Taken in a statement-level trigger, so the phase is held before the statement locks a chat row
(a step that rewrites a JSONB under the phase lock never waits for a writer that waits for it).
The lock is taken by a `SECURITY DEFINER` function: a writer's role needs no right to update
`dualwrite_phase`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from migrations import online

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

HOLD_PHASE = """
CREATE OR REPLACE FUNCTION dualwrite_hold_phase() RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT phase FROM dualwrite_phase FOR SHARE
$$
"""

HOLD_PHASE_TRIGGER_FUNCTION = """
CREATE OR REPLACE FUNCTION copilot_chats_hold_phase() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) IS DISTINCT FROM 'on' THEN
        PERFORM dualwrite_hold_phase();
    END IF;
    RETURN NULL;
END
$$
"""

# As in revision 0005, with the phase read under the lock the statement trigger took.
BUMP_VERSION = """
CREATE OR REPLACE FUNCTION copilot_chats_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) = 'on' THEN
        RETURN NEW;  -- the reverse sync sets the version it copied
    END IF;
    IF (TG_OP = 'UPDATE' OR NEW.messages IS DISTINCT FROM '[]'::jsonb)
       AND dualwrite_hold_phase() = 'table_only' THEN
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

HOLD_PHASE_TRIGGER = (
    "CREATE OR REPLACE TRIGGER copilot_chats_hold_phase "
    "BEFORE INSERT OR UPDATE OF messages ON copilot_chats "
    "FOR EACH STATEMENT EXECUTE FUNCTION copilot_chats_hold_phase()"
)


def upgrade() -> None:
    # Every write to a chat fires these triggers: each step runs under `lock_timeout`, retried,
    # and is idempotent, so a rerun after a kill resumes.
    with online.revision_steps() as step:
        step(
            "writers of the JSONB hold the phase",
            HOLD_PHASE,
            HOLD_PHASE_TRIGGER_FUNCTION,
            BUMP_VERSION,
            HOLD_PHASE_TRIGGER,
        )


def downgrade() -> None:
    plain_read = "(SELECT phase FROM dualwrite_phase)"
    with online.revision_steps() as step:
        step(
            "writers of the JSONB read the phase without holding it",
            "DROP TRIGGER IF EXISTS copilot_chats_hold_phase ON copilot_chats",
            BUMP_VERSION.replace("dualwrite_hold_phase()", plain_read),
            "DROP FUNCTION IF EXISTS copilot_chats_hold_phase()",
            "DROP FUNCTION IF EXISTS dualwrite_hold_phase()",
        )
