"""SQL on `copilot_chat_messages` as the source of truth (phase `table_only`, and after the
contract). Same operations, names and results as `app.repositories.chats`, the JSONB store.

A chat's head (its version, the next `seq`, its active stream) is its row in
`copilot_chat_sync_state`. Each write locks that row first, so concurrent appends to one chat
take consecutive `seq` values, and bumps `wanted_version` so that the reverse sync brings the
JSONB up to the rows. Nothing here writes `copilot_chats` after the insert that creates a chat:
the reverse sync holds that row while it rewrites a transcript, and an append must not wait for
it. Rows follow the mapping of the forward copy, so that a step back finds them as it left them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.repositories import chats, messages
from app.repositories.chats import Chat, TurnState
from app.repositories.sync_state import Written

# One element (`e.elem`, position `e.ord`, 1-based) of chat `c` as a row, at version `:version`:
# the forward copy's rules, so that a step back finds the rows as it would have made them.
_ROW = messages.element_row("e.elem", "c.created_at")
_ROW_COLUMNS = messages.ELEMENT_ROW_COLUMNS

# After the contract nothing follows the rows: a write is applied as soon as it is made, so no
# chat ever shows as behind. Before it, the JSONB (version 0 for a new chat) follows.
_FOLLOWED = "(SELECT contracted_at IS NULL FROM dualwrite_phase)"

# A row written again from an element (a replace, or an append bringing back a removed message).
_ROW_UPDATE = """
    seq = EXCLUDED.seq, role = EXCLUDED.role, content = EXCLUDED.content,
    stream_id = EXCLUDED.stream_id, model = EXCLUDED.model, created_at = EXCLUDED.created_at,
    deleted_at = NULL, updated_at = now(), source_version = EXCLUDED.source_version
"""

# A write moves the chat's head (`s`) to `:version`: the JSONB is behind it from now on, unless
# nothing follows the rows any more (after the contract).
_HEAD_MOVES = f"""
    wanted_version = :version,
    -- The rows move on without the JSONB: a copy from it must map the whole array again.
    elements_version = NULL,
    applied_version = CASE WHEN {_FOLLOWED} THEN s.applied_version ELSE :version END,
    dirty_since = CASE WHEN s.applied_version >= s.wanted_version THEN now()
                       ELSE s.dirty_since END
"""

# A write under the head's lock marks its sync queued if none waits (`:queue`: the phase
# copies; `_lock_head` read the mark under the same lock).
_QUEUED = """queued_since = CASE WHEN CAST(:queue AS boolean) THEN coalesce(s.queued_since, now())
                                ELSE s.queued_since END"""


def _new_head(version: str, rows: str) -> str:
    """The head of a chat just inserted as `c` (a CTE), at `version` with `rows` rows (SQL)."""
    return f"""
    head AS (
        INSERT INTO copilot_chat_sync_state AS s
            (chat_id, wanted_version, applied_version, dirty_since, next_seq)
        SELECT c.id, {version}, CASE WHEN {_FOLLOWED} THEN 0 ELSE {version} END, now(), {rows}
        FROM c
        -- Defensive: the version trigger (before the contract) only ever raises it later.
        ON CONFLICT (chat_id) DO UPDATE SET
            wanted_version = EXCLUDED.wanted_version, next_seq = EXCLUDED.next_seq,
            applied_version = EXCLUDED.applied_version, dirty_since = now(),
            elements_version = NULL
        RETURNING 1
    )"""


_META = """
    SELECT c.id, c.user_id, c.workflow_id, c.title, c.model, s.wanted_version,
           s.active_stream_id, c.created_at, c.updated_at
    FROM copilot_chats c JOIN copilot_chat_sync_state s ON s.chat_id = c.id
"""


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
    """Insert a chat and its rows; one with a transcript starts at version 1."""
    version = 1 if messages else 0
    chat_id = session.execute(
        text(
            f"""
            WITH c AS (
                INSERT INTO copilot_chats (user_id, title, model, workflow_id)
                VALUES (:user_id, :title, :model, :workflow_id)
                RETURNING id, created_at
            ),
            copied AS (
                INSERT INTO copilot_chat_messages
                    (chat_id, seq, source_version, {_ROW_COLUMNS})
                SELECT c.id, (e.ord - 1)::int, :version, {_ROW}
                FROM c CROSS JOIN LATERAL jsonb_array_elements(CAST(:messages AS jsonb))
                    WITH ORDINALITY AS e(elem, ord)
                RETURNING 1
            ),
            {_new_head(":version", ":count")}
            SELECT id FROM c
            """
        ),
        {
            "user_id": user_id,
            "title": title,
            "model": model,
            "workflow_id": workflow_id,
            "messages": _jsonb(messages),
            "version": version,
            "count": len(messages),
        },
    ).scalar_one()
    chat = get(session, chat_id, user_id)
    assert chat is not None
    return chat


def get(session: Session, chat_id: uuid.UUID, user_id: str) -> Chat | None:
    row = session.execute(
        text(f"{_META} WHERE c.id = :id AND c.user_id = :user_id"),
        {"id": chat_id, "user_id": user_id},
    ).one_or_none()
    return Chat(*row) if row else None


def get_messages(session: Session, chat_id: uuid.UUID) -> Any:
    """The live rows' elements, in order: the transcript."""
    return session.execute(
        text(
            "SELECT coalesce(jsonb_agg(content ORDER BY seq), '[]'::jsonb) "
            "FROM copilot_chat_messages WHERE chat_id = :id AND deleted_at IS NULL"
        ),
        {"id": chat_id},
    ).scalar_one()


def find_message(session: Session, chat_id: uuid.UUID, message_id: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = session.execute(
        text(
            "SELECT content FROM copilot_chat_messages "
            "WHERE chat_id = :id AND message_id = :message_id AND deleted_at IS NULL"
        ),
        {"id": chat_id, "message_id": message_id},
    ).scalar_one_or_none()
    return found


def size(session: Session, chat_id: uuid.UUID) -> tuple[int, int]:
    """(messages, bytes) of a chat's live rows, as the limit counts them: uncompressed (`||`
    with an empty object hands back the detoasted value; only large values are compressed)."""
    row = session.execute(
        text(
            "SELECT count(*), coalesce(sum(pg_column_size(content || '{}'::jsonb)), 0) "
            "FROM copilot_chat_messages WHERE chat_id = :id AND deleted_at IS NULL"
        ),
        {"id": chat_id},
    ).one()
    return int(row[0]), int(row[1])


class _Head(NamedTuple):
    version: int
    next_seq: int
    free: bool  # no sync of the chat waits in the queue (`queued_since` is unset)


def _lock_head(session: Session, chat_id: uuid.UUID, user_id: str) -> _Head | None:
    """Lock the chat's head against every other writer of it (and against a sync clearing its
    queued mark: see `sync_state.clear_queued`).

    The chat row first, `FOR KEY SHARE` (what the rows' foreign key takes anyway): a delete
    locks the chat and then, through the cascade, the head, so taking them in the same order
    never deadlocks with it. That lock does not conflict with the reverse sync's update of the
    chat row, so a write still never waits for a rewrite of the JSONB."""
    owned = session.execute(
        text("SELECT 1 FROM copilot_chats WHERE id = :id AND user_id = :user_id FOR KEY SHARE"),
        {"id": chat_id, "user_id": user_id},
    ).first()
    if owned is None:
        return None
    row = session.execute(
        text(
            """
            SELECT s.wanted_version,
                   coalesce(s.next_seq, (
                       SELECT max(m.seq) + 1 FROM copilot_chat_messages m
                       WHERE m.chat_id = s.chat_id AND m.deleted_at IS NULL
                   ), 0),
                   s.queued_since IS NULL
            FROM copilot_chat_sync_state s JOIN copilot_chats c ON c.id = s.chat_id
            WHERE s.chat_id = :id AND c.user_id = :user_id
            FOR UPDATE OF s
            """
        ),
        {"id": chat_id, "user_id": user_id},
    ).one_or_none()
    return _Head(int(row[0]), int(row[1]), bool(row[2])) if row else None


def lock_turn(session: Session, chat_id: uuid.UUID, user_id: str) -> TurnState | None:
    """The head's row lock serializes turn completion with every other writer of the chat."""
    if _lock_head(session, chat_id, user_id) is None:
        return None
    row = session.execute(
        text(
            """
            SELECT s.active_stream_id, (
                SELECT m.message_id FROM copilot_chat_messages m
                WHERE m.chat_id = s.chat_id AND m.deleted_at IS NULL
                ORDER BY m.seq DESC LIMIT 1
            )
            FROM copilot_chat_sync_state s WHERE s.chat_id = :id
            """
        ),
        {"id": chat_id},
    ).one()
    return TurnState(*row)


def append(
    session: Session,
    chat_id: uuid.UUID,
    user_id: str,
    elements: list[dict[str, Any]],
    *,
    queue: bool = False,
    set_active_stream: str | None = None,
    clear_active_stream: bool = False,
    limit: chats.ChatLimit | None = None,
) -> Written | None:
    """Insert the elements as the chat's next rows; the new version (and whether to send its
    sync: `queue` and none waits), or None when they are all there already (a retry) or the
    chat would grow past `limit` (judged under the head's lock, so two appends cannot both slip
    under it). Some there and some not is a conflict."""
    head = _lock_head(session, chat_id, user_id)
    if head is None:
        return None
    version, next_seq, free = head
    if limit is not None:
        count, stored = size(session, chat_id)
        new_bytes = len(_jsonb(elements).encode())
        if count + len(elements) > limit.messages or stored + new_bytes > limit.bytes:
            return None
    stream_sql = "s.active_stream_id"
    if set_active_stream is not None:
        stream_sql = "CAST(:stream AS text)"
    elif clear_active_stream:
        stream_sql = "NULL"
    inserted, new_version = session.execute(
        text(
            f"""
            WITH c AS (SELECT id, created_at FROM copilot_chats WHERE id = :id),
            added AS (
                INSERT INTO copilot_chat_messages AS m
                    (chat_id, seq, source_version, {_ROW_COLUMNS})
                SELECT c.id, :next_seq + (e.ord - 1)::int, :version, {_ROW}
                FROM c CROSS JOIN LATERAL jsonb_array_elements(CAST(:elements AS jsonb))
                    WITH ORDINALITY AS e(elem, ord)
                -- A message removed by a snapshot replace comes back.
                ON CONFLICT (chat_id, message_id) DO UPDATE SET {_ROW_UPDATE}
                WHERE m.deleted_at IS NOT NULL
                RETURNING 1
            ),
            head AS (
                UPDATE copilot_chat_sync_state s SET
                    {_HEAD_MOVES},
                    {_QUEUED},
                    next_seq = :next_seq + :count,
                    active_stream_id = {stream_sql}
                WHERE s.chat_id = :id AND (SELECT count(*) FROM added) = :count
                RETURNING s.wanted_version
            )
            SELECT (SELECT count(*) FROM added), (SELECT wanted_version FROM head)
            """
        ),
        {
            "id": chat_id,
            "elements": _jsonb(elements),
            "next_seq": next_seq,
            "version": version + 1,
            "count": len(elements),
            "stream": set_active_stream,
            "queue": queue,
        },
    ).one()
    if inserted == 0:
        return None
    if new_version is None:
        # The unit of work rolls back the rows this statement did insert.
        raise Conflict("some of these messages are already in this chat, not all", field=("body",))
    return Written(int(new_version), queue and free)


def replace_messages(
    session: Session,
    chat_id: uuid.UUID,
    user_id: str,
    messages: list[dict[str, Any]],
    *,
    queue: bool = False,
) -> Written | None:
    """Make the live rows exactly `messages`, in order; the new version (as `append`), or None
    when the chat is absent or nothing changed. Set-based: one upsert, one soft-delete."""
    head = _lock_head(session, chat_id, user_id)
    if head is None:
        return None
    version, _, free = head
    changed, new_version = session.execute(
        text(
            f"""
            WITH c AS (SELECT id, created_at FROM copilot_chats WHERE id = :id),
            src AS (
                SELECT c.id AS chat_id, (e.ord - 1)::int AS seq, {_ROW}
                FROM c CROSS JOIN LATERAL jsonb_array_elements(CAST(:messages AS jsonb))
                    WITH ORDINALITY AS e(elem, ord)
            ),
            upserted AS (
                INSERT INTO copilot_chat_messages AS m
                    (chat_id, seq, source_version, {_ROW_COLUMNS})
                SELECT chat_id, seq, :version, {_ROW_COLUMNS} FROM src
                ORDER BY 1, 2
                ON CONFLICT (chat_id, message_id) DO UPDATE SET {_ROW_UPDATE}
                WHERE m.deleted_at IS NOT NULL OR m.seq <> EXCLUDED.seq
                   OR m.content <> EXCLUDED.content OR m.created_at <> EXCLUDED.created_at
                RETURNING 1
            ),
            removed AS (
                UPDATE copilot_chat_messages m
                SET deleted_at = now(), updated_at = now(), source_version = :version
                WHERE m.chat_id = :id AND m.deleted_at IS NULL
                  AND m.message_id NOT IN (SELECT message_id FROM src)
                RETURNING 1
            ),
            head AS (
                UPDATE copilot_chat_sync_state s SET
                    {_HEAD_MOVES},
                    {_QUEUED},
                    next_seq = (SELECT count(*) FROM src)
                WHERE s.chat_id = :id
                  AND (SELECT count(*) FROM upserted) + (SELECT count(*) FROM removed) > 0
                RETURNING s.wanted_version
            )
            SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM removed),
                   (SELECT wanted_version FROM head)
            """
        ),
        {"id": chat_id, "messages": _jsonb(messages), "version": version + 1, "queue": queue},
    ).one()
    return Written(int(new_version), queue and free) if changed else None


def fork(session: Session, chat_id: uuid.UUID, user_id: str, up_to_message_id: str) -> Chat | None:
    """A new chat holding the live rows up to and including that message: INSERT ... SELECT."""
    new_id = session.execute(
        text(
            f"""
            WITH cut AS (
                SELECT m.seq FROM copilot_chat_messages m
                JOIN copilot_chats c ON c.id = m.chat_id
                WHERE m.chat_id = :id AND c.user_id = :user_id
                  AND m.message_id = :message_id AND m.deleted_at IS NULL
            ),
            c AS (
                INSERT INTO copilot_chats (user_id, workflow_id, title, model)
                SELECT user_id, workflow_id, title, model FROM copilot_chats
                WHERE id = :id AND EXISTS (SELECT 1 FROM cut)
                RETURNING id, created_at
            ),
            copied AS (
                INSERT INTO copilot_chat_messages
                    (chat_id, seq, source_version, {_ROW_COLUMNS})
                SELECT c.id, (row_number() OVER (ORDER BY m.seq) - 1)::int, 1,
                       m.message_id, m.role, m.stream_id, m.model, m.created_at, m.content
                FROM c, copilot_chat_messages m
                WHERE m.chat_id = :id AND m.deleted_at IS NULL
                  AND m.seq <= (SELECT seq FROM cut)
                RETURNING 1
            ),
            {_new_head("1", "(SELECT count(*) FROM copied)")}
            SELECT id FROM c
            """
        ),
        {"id": chat_id, "user_id": user_id, "message_id": up_to_message_id},
    ).scalar_one_or_none()
    return get(session, new_id, user_id) if new_id is not None else None


def page(
    session: Session, chat_id: uuid.UUID, *, limit: int, before_seq: int | None
) -> list[tuple[int, Any]]:
    return list(messages.page(session, chat_id, limit=limit, before_seq=before_seq))


def adopt_strays(session: Session, chat_id: uuid.UUID) -> int:
    """Append to the rows the elements of the chat's JSONB that the rows have never held (a
    write to the JSONB that the reverse sync refused to erase, see `chats.write_from_rows`), in
    the JSONB's order, and take the JSONB's version as applied, so that the reverse sync
    follows the rows again (the head moves past both versions: the JSONB is rewritten). How
    many were added. An element the rows hold (live, or removed
    by a replace) is the rows' business: theirs stands."""
    head = session.execute(
        text(
            """
            SELECT s.wanted_version, coalesce(s.next_seq, (
                       SELECT max(m.seq) + 1 FROM copilot_chat_messages m
                       WHERE m.chat_id = s.chat_id AND m.deleted_at IS NULL
                   ), 0)
            FROM copilot_chat_sync_state s WHERE s.chat_id = :id FOR UPDATE
            """
        ),
        {"id": chat_id},
    ).one_or_none()
    if head is None:
        return 0
    version, next_seq = int(head[0]), int(head[1])
    added = session.execute(
        text(
            f"""
            WITH c AS (
                SELECT id, created_at, messages_version, messages FROM copilot_chats
                WHERE id = :id AND jsonb_typeof(messages) = 'array'
            ),
            strays AS (
                SELECT DISTINCT ON (e.elem ->> 'id') e.elem, e.ord
                FROM c CROSS JOIN LATERAL jsonb_array_elements(c.messages)
                    WITH ORDINALITY AS e(elem, ord)
                WHERE {messages.element_valid("e.elem")}
                  AND NOT EXISTS (
                      SELECT 1 FROM copilot_chat_messages m
                      WHERE m.chat_id = c.id AND m.message_id = e.elem ->> 'id'
                  )
                ORDER BY e.elem ->> 'id', e.ord
            ),
            inserted AS (
                INSERT INTO copilot_chat_messages AS m
                    (chat_id, seq, source_version, {_ROW_COLUMNS})
                SELECT c.id, :next_seq + (row_number() OVER (ORDER BY e.ord) - 1)::int,
                       :version, {_ROW}
                FROM c, strays e
                ON CONFLICT (chat_id, message_id) DO NOTHING
                RETURNING 1
            ),
            head AS (
                -- A new version above both stores': the reverse sync then rewrites the JSONB.
                UPDATE copilot_chat_sync_state s SET
                    wanted_version = greatest(s.wanted_version, c.messages_version) + 1,
                    next_seq = :next_seq + (SELECT count(*) FROM inserted),
                    applied_version = c.messages_version,
                    elements_version = NULL,
                    dirty_since = now()
                FROM c
                WHERE s.chat_id = c.id
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM inserted) WHERE (SELECT count(*) FROM head) >= 0
            """
        ),
        {"id": chat_id, "next_seq": next_seq, "version": version + 1},
    ).scalar_one()
    return int(added)


delete = chats.delete
