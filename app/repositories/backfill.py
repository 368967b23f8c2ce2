"""The backfill's SQL: the copy of a batch of chats (shared by `migrations/backfill.py`, which
runs it inside `alembic upgrade head`, and the chunks of a fleet backfill in
`app/services/bulk_passes.py`), and reads of `dualwrite_backfill`, the state the migration keeps
(the contract drops that table). The element rules are in `migrations/backfill.py`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session

from app.repositories.sync_state import SYNC_LOCK_CLASS

__all__ = ["COPY", "ELEMENTS", "LOCK", "SYNC_LOCK_CLASS", "Progress", "copy_batch", "progress"]

VALID = """
    jsonb_typeof(e.elem) = 'object'
    AND coalesce(jsonb_typeof(e.elem -> 'id'), '') = 'string'
    AND e.elem ->> 'id' <> ''
    AND octet_length(e.elem ->> 'id') <= 1024
"""

# Every element of the chats in `kinds` (id, is_array), with whether it can be copied.
ELEMENTS = f"""
    SELECT c.id AS chat_id, c.messages_version, c.created_at, e.elem, e.ord, {VALID} AS valid
    FROM kinds k
    JOIN copilot_chats c ON c.id = k.id
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN k.is_array THEN c.messages ELSE '[]'::jsonb END
    ) WITH ORDINALITY AS e(elem, ord)
"""

COPY = """
    INSERT INTO copilot_chat_messages AS m
        (chat_id, message_id, role, seq, content, stream_id, model, created_at, updated_at,
         source_version)
    SELECT DISTINCT ON (x.chat_id, x.elem ->> 'id')
        x.chat_id,
        x.elem ->> 'id',
        coalesce(x.elem ->> 'role', 'unknown'),
        (x.ord - 1)::int,
        x.elem,
        CASE WHEN jsonb_typeof(x.elem -> 'streamId') = 'string'
                  AND octet_length(x.elem ->> 'streamId') <= 1024
             THEN x.elem ->> 'streamId' END,
        CASE WHEN jsonb_typeof(x.elem -> 'model') = 'string' THEN x.elem ->> 'model' END,
        coalesce(copilot_message_timestamp(x.elem -> 'timestamp'), x.created_at),
        now(),
        x.messages_version
    FROM elems x
    WHERE x.valid
    ORDER BY x.chat_id, x.elem ->> 'id', x.ord
    ON CONFLICT (chat_id, message_id) DO NOTHING
"""

# The per-chat locks of a live sync, in its order, and nothing more (`migrations.backfill` says
# why no row lock): a batch of the copy and a sync of one of its chats never interleave.
LOCK = text(
    """
    SELECT pg_advisory_xact_lock(:cls, hashtext(id::text))
    FROM unnest(:ids) AS id ORDER BY hashtext(id::text);
    """
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))

# The migration's batch without its cursor: a chunk records its own progress in the same
# transaction (`app.repositories.bulk_passes.advance`).
_COPY_BATCH = text(
    f"""
    WITH kinds AS MATERIALIZED (
        SELECT id, jsonb_typeof(messages) = 'array' AS is_array
        FROM copilot_chats WHERE id = ANY(:ids)
    ),
    elems AS ({ELEMENTS}),
    copied AS ({COPY} RETURNING 1),
    seeded AS (
        -- As in the migration: a chat the trigger saw written keeps what it recorded.
        INSERT INTO copilot_chat_sync_state AS s
            (chat_id, wanted_version, applied_version, synced_at)
        SELECT c.id, c.messages_version, c.messages_version, now()
        FROM copilot_chats c WHERE c.id = ANY(:ids)
        ORDER BY c.id
        ON CONFLICT (chat_id) DO UPDATE
            SET wanted_version = greatest(s.wanted_version, EXCLUDED.wanted_version)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM copied) AS copied,
           (SELECT count(*) FROM seeded) AS seeded,
           (SELECT count(*) FROM elems WHERE NOT valid) AS bad_elements,
           (SELECT count(*) FROM kinds WHERE NOT is_array) AS bad_chats
    """
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))


def copy_batch(session: Session, ids: list[uuid.UUID]) -> tuple[int, int, int]:
    """Copy these chats under the per-chat sync locks; (rows copied, bad elements, bad chats).
    Idempotent: a row already there is left alone (`ON CONFLICT DO NOTHING`)."""
    session.execute(LOCK, {"cls": SYNC_LOCK_CLASS, "ids": ids})
    copied, _, bad_elements, bad_chats = session.execute(_COPY_BATCH, {"ids": ids}).one()
    return int(copied), int(bad_elements), int(bad_chats)


def start_state(session: Session) -> None:
    """The migration's own state row, as `migrations.backfill._start` records it: the chats
    that exist now are the backfill's work."""
    session.execute(
        text(
            "INSERT INTO dualwrite_backfill (name, started_at, total_chats) "
            "SELECT :name, clock_timestamp(), count(*) FROM copilot_chats "
            "ON CONFLICT (name) DO NOTHING"
        ),
        {"name": NAME},
    )


def pending_state(session: Session) -> tuple[datetime, uuid.UUID | None] | None:
    """(started_at, cursor) of a backfill the migration left unfinished; None otherwise."""
    exists = session.execute(text("SELECT to_regclass('dualwrite_backfill') IS NOT NULL"))
    if not exists.scalar_one():
        return None
    row = session.execute(
        text(
            "SELECT started_at, cursor FROM dualwrite_backfill "
            "WHERE name = :name AND finished_at IS NULL"
        ),
        {"name": NAME},
    ).one_or_none()
    return (row[0], row[1]) if row else None


def finish_state(
    session: Session, *, chats: int, rows: int, bad_elements: int, bad_chats: int
) -> None:
    """The fleet finished the copy: the migration's state says so too."""
    session.execute(
        text(
            "UPDATE dualwrite_backfill SET finished_at = now(), "
            "chats_done = chats_done + :chats, rows_copied = rows_copied + :rows, "
            "bad_elements = bad_elements + :bad_elements, bad_chats = bad_chats + :bad_chats "
            "WHERE name = :name AND finished_at IS NULL"
        ),
        {
            "name": NAME,
            "chats": chats,
            "rows": rows,
            "bad_elements": bad_elements,
            "bad_chats": bad_chats,
        },
    )


# The row of the copy of `copilot_chats.messages` (`migrations.backfill.NAME`).
NAME = "copilot_chat_messages"


@dataclass(frozen=True, slots=True)
class Progress:
    started_at: datetime
    finished_at: datetime | None
    total_chats: int
    chats_done: int
    rows_copied: int
    bad_elements: int
    bad_chats: int

    @property
    def percent(self) -> float:
        return (
            100.0 * min(self.chats_done, self.total_chats) / self.total_chats
            if self.total_chats
            else 100.0
        )


def progress(session: Session) -> Progress | None:
    """The backfill's state; None when it never started, or the contract dropped its table."""
    exists = session.execute(text("SELECT to_regclass('dualwrite_backfill') IS NOT NULL"))
    if not exists.scalar_one():
        return None
    row = session.execute(
        text(
            "SELECT started_at, finished_at, total_chats, chats_done, rows_copied, bad_elements, "
            "bad_chats FROM dualwrite_backfill WHERE name = :name"
        ),
        {"name": NAME},
    ).one_or_none()
    return Progress(*row) if row else None
