"""SQL on `copilot_chats`, the canonical transcript.

No statement here touches `messages_version` or the sync state: the triggers of revision 0002
bump the version and record it as the chat's wanted version whenever `messages` is written, by
this code or any other writer. A committed mutation is therefore always visible to the sweep,
even if its task is never published.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session

from app.repositories.sync_state import QUEUE_MARK, QUEUE_SEND, Written

_CHAT_COLUMNS = (
    "id, user_id, workflow_id, title, model, messages_version, active_stream_id, "
    "created_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class Chat:
    id: uuid.UUID
    user_id: str
    workflow_id: str | None
    title: str | None
    model: str
    messages_version: int
    active_stream_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TurnState:
    """What turn completion needs to know, read under the chat's row lock."""

    active_stream_id: str | None
    last_message_id: str | None


@dataclass(frozen=True, slots=True)
class ChatLimit:
    """What a chat may hold (`MAX_CHAT_MESSAGES`, `MAX_CHAT_BYTES`)."""

    messages: int
    bytes: int


# The chat row (`messages`) with `:count` more elements of `:bytes` bytes stays within the limit.
_FITS = """
    coalesce(CASE WHEN jsonb_typeof(messages) = 'array' THEN jsonb_array_length(messages) END, 0)
        + :count <= :max_messages
    -- The size of the array as it would be written, uncompressed (the stored column may be
    -- compressed): what every read, fork and copy of the chat handles.
    AND pg_column_size(messages || '[]'::jsonb) + :bytes <= :max_bytes
"""


def _limit_params(limit: ChatLimit, count: int, size: int) -> dict[str, int]:
    return {
        "count": count,
        "bytes": size,
        "max_messages": limit.messages,
        "max_bytes": limit.bytes,
    }


def size(session: Session, chat_id: uuid.UUID) -> tuple[int, int]:
    """(messages, bytes) of a chat's transcript, as the limit counts them (uncompressed)."""
    row = session.execute(
        text(
            """
            SELECT coalesce(CASE WHEN jsonb_typeof(messages) = 'array'
                                 THEN jsonb_array_length(messages) END, 0),
                   pg_column_size(messages || '[]'::jsonb)
            FROM copilot_chats WHERE id = :id
            """
        ),
        {"id": chat_id},
    ).one_or_none()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _jsonb(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def create(
    session: Session,
    *,
    user_id: str,
    title: str | None,
    model: str,
    workflow_id: str | None,
    messages: list[dict[str, Any]],
) -> Chat:
    """Insert a chat; the trigger starts one with a transcript at version 1, to be copied."""
    row = session.execute(
        text(
            f"""
            INSERT INTO copilot_chats (user_id, title, model, workflow_id, messages)
            VALUES (:user_id, :title, :model, :workflow_id, CAST(:messages AS jsonb))
            RETURNING {_CHAT_COLUMNS}
            """
        ),
        {
            "user_id": user_id,
            "title": title,
            "model": model,
            "workflow_id": workflow_id,
            "messages": _jsonb(messages),
        },
    ).one()
    return Chat(*row)


def get(session: Session, chat_id: uuid.UUID, user_id: str) -> Chat | None:
    row = session.execute(
        text(f"SELECT {_CHAT_COLUMNS} FROM copilot_chats WHERE id = :id AND user_id = :user_id"),
        {"id": chat_id, "user_id": user_id},
    ).one_or_none()
    return Chat(*row) if row else None


def get_messages(session: Session, chat_id: uuid.UUID) -> Any:
    """The whole JSONB array, as stored."""
    return session.execute(
        text("SELECT messages FROM copilot_chats WHERE id = :id"), {"id": chat_id}
    ).scalar_one()


def find_message(session: Session, chat_id: uuid.UUID, message_id: str) -> dict[str, Any] | None:
    """The first element with this id, without sending the array over the wire."""
    found: dict[str, Any] | None = session.execute(
        text(
            """
            SELECT jsonb_path_query_first(messages, '$[*] ? (@.id == $id)',
                                          jsonb_build_object('id', CAST(:message_id AS text)))
            FROM copilot_chats WHERE id = :id
            """
        ),
        {"id": chat_id, "message_id": message_id},
    ).scalar_one_or_none()
    return found


def lock_turn(session: Session, chat_id: uuid.UUID, user_id: str) -> TurnState | None:
    """Lock the chat row as an update would (`FOR NO KEY UPDATE`): serializes turn completion with
    every other writer, but not with syncs, which hold chats `FOR KEY SHARE` while they copy."""
    row = session.execute(
        text(
            """
            SELECT active_stream_id,
                   CASE WHEN jsonb_typeof(messages) = 'array' THEN messages -> -1 ->> 'id' END
            FROM copilot_chats WHERE id = :id AND user_id = :user_id
            FOR NO KEY UPDATE
            """
        ),
        {"id": chat_id, "user_id": user_id},
    ).one_or_none()
    return TurnState(*row) if row else None


def append(
    session: Session,
    chat_id: uuid.UUID,
    user_id: str,
    elements: list[dict[str, Any]],
    *,
    queue: bool = False,
    set_active_stream: str | None = None,
    clear_active_stream: bool = False,
    limit: ChatLimit | None = None,
) -> Written | None:
    """Append elements unless one of their ids is already in the array, or the chat would grow
    past `limit`; the new version (and whether to send its sync: `queue` and none waits, see
    `sync_state.QUEUE_MARK`) or None.

    The id and size checks are in the `UPDATE`'s own `WHERE`, so concurrent appends serialize on
    the row lock and each judges the array the one before left: a retry sees the first's
    element, and two appends cannot both slip under the limit.
    """
    stream_sql = "active_stream_id"
    if set_active_stream is not None:
        stream_sql = "CAST(:stream AS text)"
    elif clear_active_stream:
        stream_sql = "NULL"
    probes = " OR ".join(f"messages @> CAST(:probe{i} AS jsonb)" for i in range(len(elements)))
    params: dict[str, Any] = {
        "id": chat_id,
        "user_id": user_id,
        "elements": _jsonb(elements),
        "stream": set_active_stream,
        "queue": queue,
    }
    for i, element in enumerate(elements):
        params[f"probe{i}"] = _jsonb([{"id": element["id"]}])
    fits = ""
    if limit is not None:
        fits = f"AND {_FITS}"
        params.update(_limit_params(limit, len(elements), len(params["elements"].encode())))
    return _written(
        session,
        f"""
        UPDATE copilot_chats SET
            -- `messages || :elements` (onto `[]` if the stored value is not an array), telling
            -- the version trigger that this version only appended (revision 0009).
            messages = copilot_chats_append(id, messages_version, messages,
                                            CAST(:elements AS jsonb)),
            active_stream_id = {stream_sql},
            updated_at = now()
        WHERE id = :id AND user_id = :user_id AND NOT ({probes}) {fits}
        RETURNING id, messages_version
        """,
        params,
    )


def replace_messages(
    session: Session,
    chat_id: uuid.UUID,
    user_id: str,
    messages: list[dict[str, Any]],
    *,
    queue: bool = False,
) -> Written | None:
    """Replace the whole array; the new version (as `append`), or None when the chat is absent
    or unchanged."""
    return _written(
        session,
        """
        UPDATE copilot_chats SET messages = CAST(:messages AS jsonb), updated_at = now()
        WHERE id = :id AND user_id = :user_id
          AND messages IS DISTINCT FROM CAST(:messages AS jsonb)
        RETURNING id, messages_version
        """,
        {"id": chat_id, "user_id": user_id, "messages": _jsonb(messages), "queue": queue},
    )


def _written(session: Session, update: str, params: dict[str, Any]) -> Written | None:
    """Run `update` (of one chat, returning its id and new version) and, in the same
    statement, mark the chat's sync queued."""
    row = session.execute(
        text(
            f"""
            WITH changed AS ({update}),
            {QUEUE_MARK}
            SELECT changed.messages_version, {QUEUE_SEND} FROM changed
            """
        ),
        params,
    ).one_or_none()
    return Written(int(row[0]), bool(row[1])) if row else None


def fork(session: Session, chat_id: uuid.UUID, user_id: str, up_to_message_id: str) -> Chat | None:
    """A new chat holding the transcript up to and including the first element with that id."""
    row = session.execute(
        text(
            f"""
            WITH source AS (
                SELECT c.*, (
                    SELECT min(e.ord) FROM jsonb_array_elements(c.messages)
                        WITH ORDINALITY AS e(elem, ord)
                    WHERE e.elem ->> 'id' = :message_id
                ) AS cut
                FROM copilot_chats c
                WHERE c.id = :id AND c.user_id = :user_id AND jsonb_typeof(c.messages) = 'array'
            ),
            forked AS (
                INSERT INTO copilot_chats (user_id, workflow_id, title, model, messages)
                SELECT s.user_id, s.workflow_id, s.title, s.model,
                       (SELECT jsonb_agg(e.elem ORDER BY e.ord)
                        FROM jsonb_array_elements(s.messages) WITH ORDINALITY AS e(elem, ord)
                        WHERE e.ord <= s.cut)
                FROM source s WHERE s.cut IS NOT NULL
                RETURNING {_CHAT_COLUMNS}
            )
            SELECT {_CHAT_COLUMNS} FROM forked
            """
        ),
        {"id": chat_id, "user_id": user_id, "message_id": up_to_message_id},
    ).one_or_none()
    return Chat(*row) if row else None


def delete(session: Session, chat_id: uuid.UUID, user_id: str) -> bool:
    """Delete a chat; its rows and sync state go with it through `ON DELETE CASCADE`."""
    deleted = session.execute(
        text("DELETE FROM copilot_chats WHERE id = :id AND user_id = :user_id RETURNING id"),
        {"id": chat_id, "user_id": user_id},
    ).scalar_one_or_none()
    return deleted is not None


def page(
    session: Session, chat_id: uuid.UUID, *, limit: int, before_seq: int | None
) -> list[tuple[int, Any]]:
    """The `limit` elements before position `before_seq`, oldest first, as (seq, element).

    A jsonpath slice: only the page leaves the server, not the whole array.
    """
    rows = session.execute(
        text(
            """
            WITH bounds AS MATERIALIZED (
                -- Only the scalar is kept: inlined, the length would be taken again (and the
                -- whole array read again) for every row of the page.
                SELECT least(jsonb_array_length(messages),
                             coalesce(CAST(:before_seq AS int), 2147483647)) AS stop
                FROM copilot_chats
                WHERE id = :id AND jsonb_typeof(messages) = 'array'
            )
            SELECT greatest(b.stop - :limit, 0) + p.ord - 1 AS seq, p.elem
            FROM bounds b
            JOIN copilot_chats c ON c.id = :id
            CROSS JOIN LATERAL jsonb_path_query(
                c.messages, '$[$first to $last]',
                jsonb_build_object('first', greatest(b.stop - :limit, 0), 'last', b.stop - 1)
            ) WITH ORDINALITY AS p(elem, ord)
            WHERE b.stop > 0
            ORDER BY p.ord
            """
        ),
        {"id": chat_id, "limit": limit, "before_seq": before_seq},
    ).all()
    return [(row.seq, row.elem) for row in rows]


def ids_after(
    session: Session, after: uuid.UUID | None, limit: int, *, since: timedelta | None = None
) -> list[uuid.UUID]:
    """The next `limit` chat ids after `after`, in id order (keyset pagination); with `since`,
    only chats changed within that window."""
    rows = session.execute(
        text(
            """
            SELECT id FROM copilot_chats
            WHERE (CAST(:after AS uuid) IS NULL OR id > :after)
              AND (CAST(:since AS interval) IS NULL OR updated_at >= now() - :since)
            ORDER BY id LIMIT :limit
            """
        ),
        {"after": after, "limit": limit, "since": since},
    ).scalars()
    return list(rows)


def count(session: Session, *, since: timedelta | None = None) -> int:
    return int(
        session.execute(
            text(
                "SELECT count(*) FROM copilot_chats "
                "WHERE CAST(:since AS interval) IS NULL OR updated_at >= now() - :since"
            ),
            {"since": since},
        ).scalar_one()
    )


class Diverged(NamedTuple):
    """A chat whose JSONB moved on by itself: its version is not the one the rows last wrote."""

    chat_id: uuid.UUID
    jsonb_version: int
    applied_version: int


class FromRows(NamedTuple):
    written: dict[uuid.UUID, int]  # chat -> the version its JSONB holds now
    diverged: list[Diverged]


def write_from_rows(session: Session, chat_ids: Sequence[uuid.UUID]) -> FromRows:
    """Rewrite these chats' JSONB from their live rows (the reverse sync, in `table_only`) and
    record the version each one now holds as applied (chats that no longer exist are absent).
    The caller must hold the chats' sync locks.

    The rows and their version are read in the same statement, so the pair is consistent. The
    write carries `dualwrite.reverse_sync` (transaction-local, set before any row is written),
    which the version triggers skip: this is the JSONB following the rows, not a new change to
    copy the other way.

    A chat whose JSONB version is not the one last applied was written by something else since
    (which the triggers refuse in `table_only`): rewriting it would erase that write, so it is
    left as it is and returned as diverged.
    """
    if not chat_ids:
        return FromRows({}, [])
    _close_gaps(session, chat_ids)
    rows = session.execute(
        text(
            """
            WITH marker AS MATERIALIZED (
                SELECT set_config('dualwrite.reverse_sync', 'on', true) AS flag
            ),
            target AS MATERIALIZED (
                SELECT c.id, c.messages_version, s.applied_version, s.wanted_version,
                       s.active_stream_id, c.messages_version = s.applied_version AS follows
                FROM copilot_chats c JOIN copilot_chat_sync_state s ON s.chat_id = c.id
                WHERE c.id = ANY(:ids)
            ),
            written AS (
                UPDATE copilot_chats c SET
                    messages = coalesce((
                        SELECT jsonb_agg(m.content ORDER BY m.seq) FROM copilot_chat_messages m
                        WHERE m.chat_id = c.id AND m.deleted_at IS NULL
                    ), '[]'::jsonb),
                    messages_version = t.wanted_version,
                    active_stream_id = t.active_stream_id,
                    updated_at = now()
                FROM target t
                -- The version again: judged on the newest row, should a write commit meanwhile.
                WHERE c.id = t.id AND t.follows AND c.messages_version = t.messages_version
                  AND (SELECT flag FROM marker) = 'on'
                RETURNING c.id, t.wanted_version
            ),
            marked AS (
                UPDATE copilot_chat_sync_state s
                SET applied_version = greatest(s.applied_version, w.wanted_version),
                    synced_at = now()
                FROM written w WHERE s.chat_id = w.id
                RETURNING s.chat_id
            )
            SELECT w.id, w.wanted_version, NULL::bigint, true FROM written w
            WHERE (SELECT count(*) FROM marked) >= 0
            UNION ALL
            SELECT t.id, t.messages_version, t.applied_version, false FROM target t
            WHERE NOT t.follows
            """
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"ids": sorted(chat_ids)},
    ).all()
    return FromRows(
        {row[0]: int(row[1]) for row in rows if row[3]},
        [Diverged(row[0], int(row[1]), int(row[2])) for row in rows if not row[3]],
    )


def _close_gaps(session: Session, chat_ids: Sequence[uuid.UUID]) -> None:
    """Renumber the live rows of these chats to 0, 1, 2, ... where they have gaps, which is
    what their positions in the JSONB about to be written will be. Rows copied from a JSONB with
    elements the table could not hold have gaps in `seq`, and a page cursor must name the same
    message in both stores.

    Rare (once per such chat), so only those chats' heads are locked, as every writer of the
    rows locks them, before the rows are read: no write of theirs interleaves, and the head's
    next `seq` moves with them."""
    ids = {"ids": sorted(chat_ids)}
    gapped = list(
        session.execute(
            text(
                """
                SELECT chat_id FROM copilot_chat_messages
                WHERE chat_id = ANY(:ids) AND deleted_at IS NULL
                GROUP BY chat_id
                HAVING min(seq) <> 0 OR max(seq) + 1 <> count(*)
                    OR count(DISTINCT seq) <> count(*)
                """
            ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
            ids,
        ).scalars()
    )
    if not gapped:
        return
    session.execute(
        text(
            "SELECT 1 FROM copilot_chat_sync_state WHERE chat_id = ANY(:ids) "
            "ORDER BY chat_id FOR UPDATE"
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"ids": sorted(gapped)},
    )
    session.execute(
        text(
            """
            WITH positions AS MATERIALIZED (
                SELECT id, chat_id, seq,
                       (row_number() OVER (PARTITION BY chat_id ORDER BY seq, id) - 1)::int AS pos
                FROM copilot_chat_messages
                WHERE chat_id = ANY(:ids) AND deleted_at IS NULL
            ),
            moved AS (
                UPDATE copilot_chat_messages m SET seq = p.pos
                FROM positions p WHERE m.id = p.id AND p.seq <> p.pos
                RETURNING 1
            )
            UPDATE copilot_chat_sync_state s
            SET next_seq = (SELECT count(*) FROM positions p WHERE p.chat_id = s.chat_id)
            WHERE s.chat_id = ANY(:ids) AND (SELECT count(*) FROM moved) >= 0
            """
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"ids": sorted(gapped)},
    )
