"""SQL on `copilot_chat_messages`: converge rows to the JSONB, measure drift, read pages.

Convergence is set-based and per batch of chats: one statement maps every element of each chat's
array to a row (the same rules as the backfill in revision 0002), writes only the rows that differ,
and soft-deletes the rows whose message left the array. Writes are guarded by `source_version`,
so a copy taken from an older version of a chat can never overwrite a newer one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session

from app.repositories.dead_letters import RESOLVED_BY_SYNC


def element_valid(elem: str) -> str:
    """SQL: whether the array element `elem` (an SQL expression) can be a row: an object with
    an id that is a non-empty string of at most 1024 bytes. The others are skipped and counted."""
    return (
        f"(jsonb_typeof({elem}) = 'object'"
        f" AND coalesce(jsonb_typeof({elem} -> 'id'), '') = 'string'"
        f" AND {elem} ->> 'id' <> ''"
        f" AND octet_length({elem} ->> 'id') <= 1024)"
    )


# The columns of `element_row`, in its order.
ELEMENT_ROW_COLUMNS = "message_id, role, stream_id, model, created_at, content"


def element_row(elem: str, chat_created_at: str) -> str:
    """SQL: the columns `ELEMENT_ROW_COLUMNS` of the row of the valid element `elem` of a chat
    created at `chat_created_at` (SQL expressions). The one statement of the rules, for every
    copy of elements to rows: the convergence, the diff, the appended copy, and the writes of
    `table_only`, whose rows a step back must find as the forward copy would have made them.
    (Migration 0002's backfill keeps a frozen copy of its own.)"""
    return f"""
    {elem} ->> 'id' AS message_id,
    coalesce({elem} ->> 'role', 'unknown') AS role,
    CASE WHEN jsonb_typeof({elem} -> 'streamId') = 'string'
              AND octet_length({elem} ->> 'streamId') <= 1024
         THEN {elem} ->> 'streamId' END AS stream_id,
    CASE WHEN jsonb_typeof({elem} -> 'model') = 'string' THEN {elem} ->> 'model' END AS model,
    coalesce(copilot_message_timestamp({elem} -> 'timestamp'), {chat_created_at}) AS created_at,
    {elem} AS content"""


# Which chats a statement maps, and from which position: the `target` CTE, one of these two,
# gives each chat's `id, messages_version, created_at, updated_at` and `first`, the 0-based
# position of the first element to map (0: the whole array). No `messages` here: an UPDATE ...
# FROM below would carry a copy of every chat's whole array in each candidate row; `elems` reads
# it from the table (same snapshot). No locking clause either: a locked row would be read at its
# newest version while `elems` reads the statement's snapshot. `sync_state.lock_chats` (or the
# claim) locks before the statement.
_WHOLE = """
target AS (
    SELECT id, messages_version, created_at, updated_at, 0 AS first
    FROM copilot_chats
    WHERE id = ANY(:chat_ids)
),"""

# Only the positions appended since the chat's last copy, when its record says that is all that
# changed (revision 0009): every version above the applied one only appended
# (`append_since`), and the applied version's copy was complete, at `applied_elements` elements
# (`elements_version`). The rows are then exactly the mapping of the array's first
# `applied_elements` elements, so mapping the rest gives the rows a whole mapping would.
# Anything else maps the whole array.
_APPENDED = """
target AS (
    SELECT c.id, c.messages_version, c.created_at, c.updated_at,
           CASE WHEN s.append_since <= s.applied_version
                     AND s.elements_version = s.applied_version
                     AND c.messages_version > s.applied_version
                THEN s.applied_elements ELSE 0 END AS first
    FROM copilot_chats c
    LEFT JOIN copilot_chat_sync_state s ON s.chat_id = c.id
    WHERE c.id = ANY(:chat_ids)
),"""

# The element-to-row mapping of the chats in `target`, from each one's `first` position. Must
# match the backfill rules of migration 0002. Every statement that maps elements to rows (the
# convergence, the diff, the reconcile's repairs, the copy of appended elements) uses this.
_MAPPING = (
    """
elems AS (
    SELECT
        t.id AS chat_id,
        e.elem,
        t.first + e.ord AS ord,
        """
    + element_valid("e.elem")
    + """ AS valid
    FROM copilot_chats c
    JOIN target t ON t.id = c.id
    -- From `first` on, only that slice is expanded: O(appended elements), apart from reading
    -- the stored array (a copy from position `first` is only chosen for an array).
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN t.first > 0
             THEN jsonb_path_query_array(c.messages, '$[$first to last]',
                                         jsonb_build_object('first', t.first))
             WHEN jsonb_typeof(c.messages) = 'array' THEN c.messages
             ELSE '[]'::jsonb END
    ) WITH ORDINALITY AS e(elem, ord)
    WHERE c.id = ANY(:chat_ids)  -- the chats' own rows, by their key
),
src AS (
    SELECT DISTINCT ON (x.chat_id, x.elem ->> 'id')
        x.chat_id,
        (x.ord - 1)::int AS seq,
        t.messages_version AS source_version,"""
    + element_row("x.elem", "t.created_at")
    + """
    FROM elems x
    JOIN target t ON t.id = x.chat_id
    WHERE x.valid
      -- A slice from `first`: an id that the elements before it already hold keeps its first
      -- element, as in a whole mapping; those ids are exactly the chat's live rows. (Liveness
      -- is read from the row, not put in the WHERE: that would steer the planner to a partial
      -- index over all the chat's live rows instead of the unique key.)
      AND (t.first = 0 OR NOT coalesce((
          SELECT p.deleted_at IS NULL FROM copilot_chat_messages p
          WHERE p.chat_id = x.chat_id AND p.message_id = x.elem ->> 'id'
      ), false))
    ORDER BY x.chat_id, x.elem ->> 'id', x.ord
),
changed AS (
    SELECT s.*, m.id IS NULL AS missing, m.deleted_at IS NOT NULL AS was_deleted
    FROM src s
    LEFT JOIN copilot_chat_messages m
        ON m.chat_id = s.chat_id AND m.message_id = s.message_id
        AND m.chat_id = ANY(:chat_ids)  -- lets the planner read only these chats' rows
    WHERE m.id IS NULL
        OR m.deleted_at IS NOT NULL
        OR m.seq <> s.seq
        OR m.role <> s.role
        OR m.created_at <> s.created_at
        OR m.stream_id IS DISTINCT FROM s.stream_id
        OR m.model IS DISTINCT FROM s.model
        OR m.content <> s.content
),
element_counts AS (
    -- The elements before `first` were all valid (their copy was complete).
    SELECT t.id AS chat_id, t.first + count(x.chat_id) AS total,
           count(*) FILTER (WHERE NOT x.valid) AS bad
    FROM target t LEFT JOIN elems x ON x.chat_id = t.id
    GROUP BY t.id, t.first
),
extra AS (
    -- Only a whole mapping knows which rows left the array (a slice's chats lost none).
    -- A set difference, not NOT EXISTS against a CTE: the planner cannot estimate the CTE and
    -- would pick a nested loop, quadratic in the size of the chat.
    SELECT m.id, m.chat_id
    FROM (
        SELECT r.chat_id, r.message_id
        FROM target t
        JOIN copilot_chat_messages r ON r.chat_id = t.id AND r.deleted_at IS NULL
        WHERE t.first = 0
        EXCEPT
        SELECT chat_id, message_id FROM src
    ) gone
    JOIN copilot_chat_messages m
        ON m.chat_id = gone.chat_id AND m.message_id = gone.message_id
)
"""
)

# The convergence after its `target`: writes the rows that differ, soft-deletes the rows that
# left the array, records what it applied.
_CONVERGE_REST = (
    _MAPPING
    + """,
upserted AS (
    INSERT INTO copilot_chat_messages AS m
        (chat_id, message_id, role, seq, content, stream_id, model, created_at, updated_at,
         deleted_at, source_version)
    SELECT chat_id, message_id, role, seq, content, stream_id, model, created_at, now(), NULL,
           source_version
    FROM changed
    ORDER BY chat_id, message_id
    ON CONFLICT (chat_id, message_id) DO UPDATE SET
        role = EXCLUDED.role,
        seq = EXCLUDED.seq,
        content = EXCLUDED.content,
        stream_id = EXCLUDED.stream_id,
        model = EXCLUDED.model,
        created_at = EXCLUDED.created_at,
        updated_at = now(),
        deleted_at = NULL,
        source_version = EXCLUDED.source_version
    WHERE m.source_version <= EXCLUDED.source_version
    RETURNING m.chat_id, (xmax = 0) AS inserted
),
removed AS (
    UPDATE copilot_chat_messages m
    SET deleted_at = now(), updated_at = now(), source_version = t.messages_version
    FROM extra x
    JOIN target t ON t.id = x.chat_id
    WHERE m.id = x.id AND m.source_version <= t.messages_version
    RETURNING m.chat_id
),
-- Not referenced below, so PostgreSQL runs these two after the rest of the statement: the
-- sync state rows (which handlers' version triggers also write) are locked only from here to
-- the commit, not for the whole convergence.
marked AS (
    -- A copy is complete when every element was valid and the guard held back no write: the
    -- rows are then exactly the mapping of the array at this version, which a later copy of
    -- what is appended to it builds on (`elements_version`, `applied_elements`).
    INSERT INTO copilot_chat_sync_state AS s
        (chat_id, wanted_version, applied_version, synced_at, elements_version,
         applied_elements)
    SELECT t.id, t.messages_version, t.messages_version, now(),
           CASE WHEN coalesce(e.bad, 0) = 0
                     AND (SELECT count(*) FROM changed c WHERE c.chat_id = t.id)
                         = (SELECT count(*) FROM upserted u WHERE u.chat_id = t.id)
                     AND (SELECT count(*) FROM extra x WHERE x.chat_id = t.id)
                         = (SELECT count(*) FROM removed r WHERE r.chat_id = t.id)
                THEN t.messages_version END,
           coalesce(e.total, 0)
    FROM target t LEFT JOIN element_counts e ON e.chat_id = t.id
    ORDER BY t.id
    ON CONFLICT (chat_id) DO UPDATE SET
        applied_version = greatest(s.applied_version, EXCLUDED.applied_version),
        wanted_version = greatest(s.wanted_version, EXCLUDED.applied_version),
        synced_at = now(),
        elements_version = CASE WHEN s.applied_version <= EXCLUDED.applied_version
                                THEN EXCLUDED.elements_version ELSE s.elements_version END,
        applied_elements = CASE WHEN s.applied_version <= EXCLUDED.applied_version
                                THEN EXCLUDED.applied_elements ELSE s.applied_elements END
    -- A chat already recorded at this version (a reconcile of an in-sync table) writes nothing.
    WHERE s.applied_version < EXCLUDED.applied_version
       OR s.wanted_version < EXCLUDED.applied_version
       OR (s.applied_version = EXCLUDED.applied_version
           AND (s.elements_version IS DISTINCT FROM EXCLUDED.elements_version
                OR s.applied_elements IS DISTINCT FROM EXCLUDED.applied_elements))
),
resolved AS (
    -- A clean copy closes what the chat's failures left open; its skipped elements' letter
    -- only once none is skipped any more.
    UPDATE dualwrite_dead_letters d SET resolved_at = now()
    WHERE d.resolved_at IS NULL AND d.chat_id IN (SELECT id FROM target)
      AND (d.reason = ANY(:resolved_by_sync)
           OR (d.reason = 'bad_elements'
               AND d.chat_id NOT IN (SELECT chat_id FROM element_counts WHERE bad > 0)))
)
SELECT
    t.id,
    t.messages_version,
    t.updated_at,
    coalesce(e.total, 0),
    coalesce(e.bad, 0),
    coalesce(u.inserted, 0),
    coalesce(u.updated, 0),
    coalesce(r.removed, 0),
    clock_timestamp(),
    t.first
FROM target t
LEFT JOIN element_counts e ON e.chat_id = t.id
LEFT JOIN (
    SELECT chat_id, count(*) FILTER (WHERE inserted) AS inserted,
           count(*) FILTER (WHERE NOT inserted) AS updated
    FROM upserted GROUP BY chat_id
) u ON u.chat_id = t.id
LEFT JOIN (SELECT chat_id, count(*) AS removed FROM removed GROUP BY chat_id) r
    ON r.chat_id = t.id
ORDER BY t.id
"""
)

_CONVERGE = text("WITH" + _WHOLE + _CONVERGE_REST).bindparams(
    bindparam("chat_ids", type_=ARRAY(UUID(as_uuid=True)))
)
_CONVERGE_APPENDED = text("WITH" + _APPENDED + _CONVERGE_REST).bindparams(
    bindparam("chat_ids", type_=ARRAY(UUID(as_uuid=True)))
)

_DIFF = text(
    "WITH"
    + _WHOLE
    + _MAPPING
    + """
SELECT
    t.id,
    t.messages_version,
    t.updated_at,
    coalesce(e.total, 0),
    coalesce(e.bad, 0),
    coalesce(c.missing, 0),
    coalesce(c.stale, 0),
    coalesce(x.extra, 0),
    clock_timestamp()
FROM target t
LEFT JOIN element_counts e ON e.chat_id = t.id
LEFT JOIN (
    SELECT chat_id, count(*) FILTER (WHERE missing) AS missing,
           count(*) FILTER (WHERE NOT missing) AS stale
    FROM changed GROUP BY chat_id
) c ON c.chat_id = t.id
LEFT JOIN (SELECT chat_id, count(*) AS extra FROM extra GROUP BY chat_id) x
    ON x.chat_id = t.id
ORDER BY t.id
"""
).bindparams(bindparam("chat_ids", type_=ARRAY(UUID(as_uuid=True))))


# The cheap comparison that runs before `_DIFF` or `_CONVERGE`. Per chat, the array's elements
# are paired with the live rows by position (`seq`), in a hash join within the chat, and each
# pair is checked against the mapping's rules. Unlike the diff, nothing is sorted by message id,
# no element is joined to the whole table, and nothing is counted by kind: one pass that only
# answers "equal or not". A chat it cannot clear goes to the diff (or the convergence), which
# says how it differs.
#
# Why a cleared chat is one in which `converge` changes no row:
# - the join is full, so every element pairs with a live row at its position and every live row
#   with an element; each pair's element is a valid one (an object with a non-empty string id of
#   at most 1,024 bytes) whose id is its row's `message_id`. `(chat_id, message_id)` is unique,
#   so no two elements share an id (no duplicate shadowed, none skipped), no two live rows share
#   a `seq`, and the pairing is one to one: nothing to insert and no live row extra;
# - in each pair, content, role, stream_id, model and created_at are compared as `_CONVERGE`
#   compares them, each derived value computed from the element as `_MAPPING` does, so a row
#   changed behind the mapping's back (by a script, say) is caught.
# created_at is checked without `copilot_message_timestamp` (PL/pgSQL, a subtransaction per
# call) when the element's `timestamp` is the row's instant printed in the ISO form clients send;
# that string is one the function parses to exactly that instant. Any other goes through it.
#
# `settled` says whether `converge` would also write nothing else for the chat: its sync state
# already records this version, and no dead letter is open for it (a convergence may close it).
_EQUAL = text(
    """
SELECT
    c.id,
    c.messages_version,
    c.updated_at,
    r.live,
    clock_timestamp(),
    coalesce(s.applied_version >= c.messages_version
             AND s.wanted_version >= c.messages_version, false)
        AND NOT EXISTS (
            SELECT 1 FROM dualwrite_dead_letters d
            WHERE d.chat_id = c.id AND d.resolved_at IS NULL
        )
FROM copilot_chats c
CROSS JOIN LATERAL (
    SELECT
        count(m.seq) AS live,
        -- An unpaired element or row is not equal, and costs no more than this first test
        -- (the rest is not evaluated): a chat that differs in every element, as in an empty
        -- table, costs little more than unnesting its array.
        coalesce(bool_and((
            e.ord IS NOT NULL AND m.seq IS NOT NULL
            AND e.elem = m.content
            AND jsonb_typeof(e.elem) = 'object'
            AND jsonb_typeof(e.elem -> 'id') = 'string'
            AND e.elem ->> 'id' = m.message_id
            AND m.message_id <> ''
            AND octet_length(m.message_id) <= 1024
            AND m.role = coalesce(e.elem ->> 'role', 'unknown')
            AND m.stream_id IS NOT DISTINCT FROM (
                CASE WHEN jsonb_typeof(e.elem -> 'streamId') = 'string'
                          AND octet_length(e.elem ->> 'streamId') <= 1024
                     THEN e.elem ->> 'streamId' END)
            AND m.model IS NOT DISTINCT FROM (
                CASE WHEN jsonb_typeof(e.elem -> 'model') = 'string'
                     THEN e.elem ->> 'model' END)
            AND CASE WHEN m.created_at = date_trunc('milliseconds', m.created_at)
                          AND m.created_at >= '1000-01-01T00:00:00Z'
                          AND m.created_at < '9999-01-01T00:00:00Z'
                          AND e.elem ->> 'timestamp' = to_char(
                              m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
                     THEN true
                     ELSE m.created_at = coalesce(
                         copilot_message_timestamp(e.elem -> 'timestamp'), c.created_at)
                END
        ) IS TRUE), true) AS equal  -- IS TRUE: an unknown is no match (bool_and skips NULLs)
    FROM jsonb_array_elements(
        CASE WHEN jsonb_typeof(c.messages) = 'array' THEN c.messages ELSE '[]'::jsonb END
    ) WITH ORDINALITY AS e(elem, ord)
    -- The rows' columns are read from the table here, the elements' fields from `e.elem`: each
    -- reference to a stored value that is out of line would fetch it again.
    FULL JOIN (
        SELECT seq, message_id, role, content, stream_id, model, created_at
        FROM copilot_chat_messages
        WHERE chat_id = c.id AND deleted_at IS NULL
    ) m ON m.seq = e.ord - 1
) r
LEFT JOIN copilot_chat_sync_state s ON s.chat_id = c.id
WHERE c.id = ANY(:chat_ids) AND r.equal
ORDER BY c.id
"""
).bindparams(bindparam("chat_ids", type_=ARRAY(UUID(as_uuid=True))))


@dataclass(frozen=True, slots=True)
class ChatCounts:
    """Per chat: what the JSONB holds and how the rows differ from it (or were changed)."""

    chat_id: uuid.UUID
    version: int
    updated_at: datetime
    elements: int
    bad_elements: int
    inserted: int  # missing rows (in a diff: rows that would be inserted)
    updated: int  # stale or soft-deleted rows brought back in line
    removed: int  # live rows whose message left the array
    done_at: datetime  # the end of the statement (`clock_timestamp()`), for exact lag
    # The position the mapping started from: 0 for the whole array, else the copy mapped only
    # the elements appended since the chat's last complete copy.
    first: int = 0

    @property
    def drift(self) -> int:
        return self.inserted + self.updated + self.removed


def _counts(rows: Sequence[Any]) -> list[ChatCounts]:
    return [ChatCounts(*row) for row in rows]


def converge(
    session: Session, chat_ids: Sequence[uuid.UUID], *, appended: bool = False
) -> list[ChatCounts]:
    """Make the rows of these chats equal to their JSONB; one row of counts per existing chat.

    With `appended`, a chat whose record says that it only grew since its last complete copy
    (see revision 0009) has only the new elements mapped, by position, which ends in the same
    rows as mapping the whole array; any other chat is mapped whole. Without it every chat is
    mapped whole, which also repairs rows changed behind the copy's back (a reconcile's job).

    The same statement records each chat's copied version as applied and closes the dead
    letters that a clean copy resolves (see `dead_letters.RESOLVED_BY_SYNC`). The caller must
    hold the chats' sync locks (`sync_state.lock_chats` or `sync_state.claim`)."""
    if not chat_ids:
        return []
    return _counts(
        session.execute(
            _CONVERGE_APPENDED if appended else _CONVERGE,
            {"chat_ids": sorted(chat_ids), "resolved_by_sync": list(RESOLVED_BY_SYNC)},
        ).all()
    )


def diff(session: Session, chat_ids: Sequence[uuid.UUID]) -> list[ChatCounts]:
    """What `converge` would change for these chats, without changing anything."""
    if not chat_ids:
        return []
    return _counts(session.execute(_DIFF, {"chat_ids": sorted(chat_ids)}).all())


def equal(
    session: Session, chat_ids: Sequence[uuid.UUID], *, settled: bool = False
) -> list[ChatCounts]:
    """Those of these chats whose rows provably equal their JSONB, as counts without drift:
    `diff` would find nothing in them. With `settled`, only those in which `converge` would
    write nothing at all (see `_EQUAL`), so a repair may leave them out. A chat not returned
    may still be equal: only `diff` or `converge` says how it differs."""
    if not chat_ids:
        return []
    rows = session.execute(_EQUAL, {"chat_ids": sorted(chat_ids)}).all()
    return [
        ChatCounts(chat_id, version, updated_at, live, 0, 0, 0, 0, done_at)
        for chat_id, version, updated_at, live, done_at, quiet in rows
        if quiet or not settled
    ]


def page(
    session: Session, chat_id: uuid.UUID, *, limit: int, before_seq: int | None
) -> list[tuple[int, dict[str, Any]]]:
    """The newest `limit` live rows before `before_seq`, oldest first, as (seq, element).

    The page leaves the server as one JSON value (`[[seq, element], ...]`): one value to decode
    instead of a row and a `jsonb` value per message, which is most of a page's cost here."""
    page: list[list[Any]] = session.execute(
        text(
            """
            SELECT coalesce(json_agg(json_build_array(seq, content) ORDER BY seq), '[]')
            FROM (
                SELECT seq, content FROM copilot_chat_messages
                WHERE chat_id = :chat_id AND deleted_at IS NULL
                  AND (CAST(:before_seq AS int) IS NULL OR seq < :before_seq)
                ORDER BY seq DESC
                LIMIT :limit
            ) newest
            """
        ),
        {"chat_id": chat_id, "before_seq": before_seq, "limit": limit},
    ).scalar_one()
    return [(seq, element) for seq, element in page]
