"""Expand: `messages_version`, the normalized `copilot_chat_messages` table, and its backfill.

The backfill is one idempotent `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, so that
`alembic upgrade head` alone brings an existing database up to date. Rules, shared with the live
sync so that the table is a pure function of the JSONB:

- an element that is not an object, or whose `id` is not a non-empty string of at most 1,024
  bytes (a longer one could not be indexed), is skipped and counted;
- where an id repeats, the first occurrence wins and `seq` is its 0-based position in the array;
- `stream_id` is the element's `streamId` when that is a string of at most 1,024 bytes (it is
  indexed), else null;
- `created_at` is the element's `timestamp`, or the chat's `created_at` when that is missing or
  unparseable; `content` is the whole element;
- a chat whose `messages` is not an array contributes nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import logging

from alembic import op
from sqlalchemy import text

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

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

ELEMENTS = """
    FROM copilot_chats c
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(c.messages) = 'array' THEN c.messages ELSE '[]'::jsonb END
    ) WITH ORDINALITY AS e(elem, ord)
"""

VALID = """
    jsonb_typeof(e.elem) = 'object'
    AND coalesce(jsonb_typeof(e.elem -> 'id'), '') = 'string'
    AND e.elem ->> 'id' <> ''
    AND octet_length(e.elem ->> 'id') <= 1024
"""

BACKFILL = f"""
INSERT INTO copilot_chat_messages AS m
    (chat_id, message_id, role, seq, content, stream_id, model, created_at, updated_at,
     source_version)
SELECT DISTINCT ON (c.id, e.elem ->> 'id')
    c.id,
    e.elem ->> 'id',
    coalesce(e.elem ->> 'role', 'unknown'),
    (e.ord - 1)::int,
    e.elem,
    CASE WHEN jsonb_typeof(e.elem -> 'streamId') = 'string'
              AND octet_length(e.elem ->> 'streamId') <= 1024
         THEN e.elem ->> 'streamId' END,
    CASE WHEN jsonb_typeof(e.elem -> 'model') = 'string' THEN e.elem ->> 'model' END,
    coalesce(copilot_message_timestamp(e.elem -> 'timestamp'), c.created_at),
    now(),
    c.messages_version
{ELEMENTS}
WHERE {VALID}
ORDER BY c.id, e.elem ->> 'id', e.ord
ON CONFLICT (chat_id, message_id) DO NOTHING
"""

COUNT_SKIPPED = f"""
SELECT
    (SELECT count(*) FROM copilot_chats WHERE jsonb_typeof(messages) <> 'array'),
    count(*) FILTER (WHERE NOT ({VALID}))
{ELEMENTS}
"""


def upgrade() -> None:
    op.execute("ALTER TABLE copilot_chats ADD COLUMN messages_version bigint NOT NULL DEFAULT 0")
    op.execute(
        """
        CREATE TABLE copilot_chat_messages (
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
    )
    op.execute(
        "CREATE INDEX copilot_chat_messages_created_idx "
        "ON copilot_chat_messages (chat_id, created_at, id) WHERE deleted_at IS NULL"
    )
    op.execute(
        "CREATE INDEX copilot_chat_messages_stream_idx "
        "ON copilot_chat_messages (chat_id, stream_id) WHERE stream_id IS NOT NULL"
    )
    op.execute(
        "CREATE INDEX copilot_chat_messages_seq_idx "
        "ON copilot_chat_messages (chat_id, seq) WHERE deleted_at IS NULL"
    )
    op.execute(
        """
        CREATE TABLE copilot_chat_sync_state (
            chat_id uuid PRIMARY KEY REFERENCES copilot_chats (id) ON DELETE CASCADE,
            wanted_version bigint NOT NULL,
            applied_version bigint NOT NULL,
            dirty_since timestamptz,
            synced_at timestamptz
        )
        """
    )
    op.execute(
        "CREATE INDEX copilot_chat_sync_state_behind_idx "
        "ON copilot_chat_sync_state (dirty_since) WHERE applied_version < wanted_version"
    )
    op.execute(PARSE_TIMESTAMP)

    bind = op.get_bind()
    bad_chats, bad_elements = bind.execute(text(COUNT_SKIPPED)).one()
    copied = bind.execute(text(BACKFILL)).rowcount
    bind.execute(
        text(
            "INSERT INTO copilot_chat_sync_state (chat_id, wanted_version, applied_version, "
            "synced_at) SELECT id, messages_version, messages_version, now() FROM copilot_chats "
            "ON CONFLICT (chat_id) DO NOTHING"
        )
    )
    log.info(
        "backfill: copied %d messages; skipped %d bad elements and %d chats whose messages "
        "is not an array",
        copied,
        bad_elements,
        bad_chats,
    )


def downgrade() -> None:
    op.execute("DROP TABLE copilot_chat_sync_state")
    op.execute("DROP TABLE copilot_chat_messages")
    op.execute("DROP FUNCTION copilot_message_timestamp(jsonb)")
    op.execute("ALTER TABLE copilot_chats DROP COLUMN messages_version")
