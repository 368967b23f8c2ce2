"""SQL on `copilot_chat_sync_state`: which version of each chat the table reflects."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session

from app.repositories.dead_letters import BLOCKING

# Advisory lock class for per-chat syncs (the key is a hash of the chat id).
SYNC_LOCK_CLASS = 7301


def lock_chats(session: Session, chat_ids: Sequence[uuid.UUID]) -> None:
    """Serialize syncs of the same chat until commit, taking locks in id order (no deadlock).

    Two syncs of one chat must not interleave: each reads the JSONB after the other's rows are
    committed, so a message removed in between is soft-deleted rather than resurrected. The
    chats are also locked `FOR KEY SHARE`, which handlers' updates do not wait for but a delete
    does: a chat deleted before this point is simply missing to the sync that follows, instead
    of failing the foreign key at commit. Both happen before the convergence statement takes its
    snapshot.
    """
    ids = [str(c) for c in sorted(chat_ids)]
    session.execute(
        text(
            "SELECT pg_advisory_xact_lock(:cls, hashtext(id::text)) "
            "FROM unnest(CAST(:ids AS uuid[])) AS id ORDER BY hashtext(id::text)"
        ),
        {"cls": SYNC_LOCK_CLASS, "ids": ids},
    )
    session.execute(
        text(
            "SELECT id FROM copilot_chats WHERE id = ANY(CAST(:ids AS uuid[])) "
            "ORDER BY id FOR KEY SHARE"
        ),
        {"ids": ids},
    )


def versions(session: Session, chat_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[int, int]]:
    """Per chat: (wanted version, applied version)."""
    rows = session.execute(
        text(
            "SELECT chat_id, wanted_version, applied_version FROM copilot_chat_sync_state "
            "WHERE chat_id = ANY(:ids)"
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"ids": list(chat_ids)},
    ).all()
    return {row.chat_id: (row.wanted_version, row.applied_version) for row in rows}


@dataclass(frozen=True, slots=True)
class Due:
    """A chat the sweep found behind: `send` if no sync of it waits (the sweep marked it
    queued), else a waiting sync stands for it (coalesced)."""

    chat_id: uuid.UUID
    wanted_version: int
    send: bool


def mark_behind(session: Session, *, grace: timedelta, ttl: timedelta, limit: int) -> list[Due]:
    """Chats whose newest version is not copied yet and has waited longer than `grace`, the
    longest-waiting first; those with no sync waiting (`queued_since` unset, or set longer ago
    than `ttl`: a task lost with its worker) are marked queued in the same statement.

    `dirty_since` keeps saying since when each chat has been behind, which is what
    `oldest_behind_seconds` reports. Skips chats with an open failed or worker-lost dead
    letter: those wait for an operator's replay. Reads only the partial index over
    `applied_version < wanted_version`, which is empty when everything is in sync.
    """
    rows = session.execute(
        text(
            """
            WITH due AS MATERIALIZED (
                SELECT b.chat_id, b.wanted_version, b.dirty_since,
                       b.queued_since IS NULL OR b.queued_since < now() - :ttl AS free
                FROM copilot_chat_sync_state b
                WHERE b.applied_version < b.wanted_version
                  AND b.dirty_since < now() - :grace
                  AND NOT EXISTS (
                      SELECT 1 FROM dualwrite_dead_letters d
                      WHERE d.chat_id = b.chat_id AND d.resolved_at IS NULL
                        AND d.reason = ANY(:blocking)
                  )
                ORDER BY b.dirty_since
                LIMIT :limit
            ),
            marked AS (
                UPDATE copilot_chat_sync_state s SET queued_since = now()
                FROM due WHERE s.chat_id = due.chat_id AND due.free
                RETURNING s.chat_id
            )
            SELECT due.chat_id, due.wanted_version, due.chat_id IN (SELECT chat_id FROM marked)
            FROM due ORDER BY due.dirty_since
            """
        ),
        {"grace": grace, "ttl": ttl, "limit": limit, "blocking": list(BLOCKING)},
    ).all()
    return [Due(row[0], row[1], row[2]) for row in rows]


class Written(NamedTuple):
    """A write of a chat: its new version, and whether its sync must be sent (the write's
    statement marked it queued: none was waiting)."""

    version: int
    send: bool


# The mark a write sets in its own statement when it sends a sync of its chat, as a CTE after
# `changed` (the write's CTE, returning the chat's `id`), when `:queue` (the phase copies). It
# updates the chat's sync state row whether or not a mark is there: an UPDATE locks the newest
# version of the row and judges that one (a condition in its WHERE would be judged on the
# statement's snapshot, which may predate the clear of a sync that started meanwhile), and the
# lock holds a sync's clear back until this write commits. The write sends iff the mark is its
# own (`now()` is its transaction's start), or there is no sync state to mark.
QUEUE_MARK = """
    queued AS (
        UPDATE copilot_chat_sync_state s SET queued_since = coalesce(s.queued_since, now())
        FROM changed WHERE s.chat_id = changed.id AND CAST(:queue AS boolean)
        RETURNING s.queued_since = now() AS mine
    )"""
QUEUE_SEND = "(CAST(:queue AS boolean) AND coalesce((SELECT mine FROM queued), true))"


def clear_queued(session: Session | Connection, chat_ids: Sequence[uuid.UUID]) -> None:
    """A sync starts (or could not be sent): from now on a write of these chats sends a sync
    of its own.

    Commit this before the sync reads anything. A write holds its chat's sync state row from
    the moment it finds the mark until it commits (see `QUEUE_MARK`; in `table_only`, the head
    lock), so this waits for a write that found the mark set and sent nothing: that write is
    committed before the sync takes its snapshot, and the sync reads it. A write that comes
    after finds the mark cleared and sends its own."""
    session.execute(
        text(
            "UPDATE copilot_chat_sync_state SET queued_since = NULL "
            "WHERE chat_id = ANY(:ids) AND queued_since IS NOT NULL"
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"ids": list(chat_ids)},
    )


_CLEAR_BEFORE_SYNC = text(
    """
    UPDATE copilot_chat_sync_state s SET queued_since = NULL
    FROM (SELECT set_config('synchronous_commit', 'off', true)) AS asynchronous_commit
    WHERE s.chat_id = ANY(CAST(:ids AS uuid[])) AND s.queued_since IS NOT NULL
    """
)


def clear_queued_before_sync(connection: Connection, chat_ids: Sequence[uuid.UUID]) -> None:
    """`clear_queued` for a sync about to start, in a transaction of its own that the caller
    commits on the same connection before the sync's transaction begins.

    Its commit does not wait for the WAL to reach the disk (`synchronous_commit` off for this
    transaction only): it is visible to every writer at once all the same, which is what the
    ordering needs, and it reaches the disk with the sync's own commit, which flushes the WAL
    written before it. If the server crashes before that, the mark is still set, which is
    true: the sync did not commit, and its task runs again (retried, or redelivered)."""
    connection.execute(_CLEAR_BEFORE_SYNC, {"ids": [str(c) for c in chat_ids]})


def hold_queued(session: Session, chat_id: uuid.UUID, *, seconds: float) -> None:
    """A retry waits `seconds` in the broker: its chat counts as queued from when it is due."""
    session.execute(
        text(
            "UPDATE copilot_chat_sync_state "
            "SET queued_since = now() + make_interval(secs => :seconds) WHERE chat_id = :id"
        ),
        {"id": chat_id, "seconds": seconds},
    )


def oldest_behind_seconds(session: Session) -> float:
    """Seconds since the longest-waiting chat fell behind (0 when none is), not counting chats
    parked in a failed or worker-lost dead letter: those have their own gauge, and one of them
    must not mask (or fake) a stalled worker. Grows without bound while nothing consumes."""
    age = session.execute(
        text(
            """
            SELECT extract(epoch FROM now() - b.dirty_since) FROM copilot_chat_sync_state b
            WHERE b.applied_version < b.wanted_version AND b.dirty_since IS NOT NULL
              AND NOT EXISTS (
                  SELECT 1 FROM dualwrite_dead_letters d
                  WHERE d.chat_id = b.chat_id AND d.resolved_at IS NULL
                    AND d.reason = ANY(:blocking)
              )
            ORDER BY b.dirty_since
            LIMIT 1
            """
        ),
        {"blocking": list(BLOCKING)},
    ).scalar_one_or_none()
    return max(0.0, float(age)) if age is not None else 0.0


def count_behind(session: Session) -> int:
    return int(
        session.execute(
            text(
                "SELECT count(*) FROM copilot_chat_sync_state "
                "WHERE applied_version < wanted_version"
            )
        ).scalar_one()
    )


def behind_ids(
    session: Session, *, after: uuid.UUID | None = None, limit: int
) -> dict[uuid.UUID, int]:
    """Up to `limit` chats that are behind, dead-lettered or not, after chat id `after` in id
    order: chat id -> wanted version."""
    rows = session.execute(
        text(
            "SELECT chat_id, wanted_version FROM copilot_chat_sync_state "
            "WHERE applied_version < wanted_version "
            "AND (CAST(:after AS uuid) IS NULL OR chat_id > :after) "
            "ORDER BY chat_id LIMIT :limit"
        ),
        {"after": after, "limit": limit},
    ).all()
    return {row.chat_id: row.wanted_version for row in rows}


class Behind(NamedTuple):
    chat_id: uuid.UUID
    wanted_version: int
    dirty_since: datetime


def behind_before(
    session: Session, started: datetime, after: Behind | None, *, limit: int
) -> list[Behind]:
    """The next `limit` chats that have been behind since `started` or earlier, after `after`
    in (`dirty_since`, id) order: a walk over a finite set, however fast chats fall behind
    meanwhile (one that catches up and falls behind again moves past `started`). Reads the
    partial index of chats behind."""
    rows = session.execute(
        text(
            """
            SELECT chat_id, wanted_version, dirty_since FROM copilot_chat_sync_state
            WHERE applied_version < wanted_version AND dirty_since <= :started
              AND (CAST(:after_at AS timestamptz) IS NULL
                   OR (dirty_since, chat_id) > (:after_at, CAST(:after_id AS uuid)))
            ORDER BY dirty_since, chat_id LIMIT :limit
            """
        ),
        {
            "started": started,
            "after_at": after.dirty_since if after else None,
            "after_id": after.chat_id if after else None,
            "limit": limit,
        },
    ).all()
    return [Behind(*row) for row in rows]


def now(session: Session) -> datetime:
    """The database's clock (`clock_timestamp()`), for comparisons with its timestamps."""
    return session.execute(text("SELECT clock_timestamp()")).scalar_one()  # type: ignore[no-any-return]


def start_table_heads(session: Session) -> None:
    """Entering `table_only`: each chat's head starts from its JSONB-era state. The next `seq`
    is recomputed from the rows on first use (appends to the JSONB did not keep it), and the
    active stream moves here from `copilot_chats`, which table writes never touch."""
    session.execute(
        text(
            """
            UPDATE copilot_chat_sync_state s
            SET next_seq = NULL, active_stream_id = c.active_stream_id
            FROM copilot_chats c
            WHERE c.id = s.chat_id
              AND (s.next_seq IS NOT NULL OR s.active_stream_id IS DISTINCT FROM c.active_stream_id)
            """
        )
    )


@dataclass(frozen=True, slots=True)
class Claimed:
    """A chat a sync holds, with its versions as the claim read them."""

    chat_id: uuid.UUID
    wanted_version: int
    applied_version: int
    own: bool  # named by the task (waited for), not picked up from the backlog
    exists: bool  # False: deleted before the sync got to it
    open_letters: bool  # it has an open dead letter


@dataclass(frozen=True, slots=True)
class Claim:
    phase: str
    contracted: bool
    chats: list[Claimed]


_CLAIM = text(
    """
    WITH phase AS MATERIALIZED (
        -- First: a phase change takes this row FOR UPDATE, then the sync locks below.
        SELECT phase, contracted_at IS NOT NULL AS contracted FROM dualwrite_phase FOR SHARE
    ),
    own AS MATERIALIZED (
        -- Waits for a sync of the task's own chats already running: that one's snapshot may
        -- predate the write this task stands for.
        SELECT o.id, pg_advisory_xact_lock(:cls, hashtext(o.id::text)) IS NULL AS waited
        FROM unnest(CAST(:own AS uuid[])) AS o(id), phase
        ORDER BY hashtext(o.id::text)
    ),
    candidates AS MATERIALIZED (
        -- Other chats behind, oldest first, without an open dead letter (a chat that makes its
        -- syncs fail must not make a whole batch fail).
        SELECT b.chat_id FROM copilot_chat_sync_state b
        WHERE b.applied_version < b.wanted_version
          AND b.chat_id <> ALL(CAST(:own AS uuid[]))
          AND (SELECT count(*) FROM own) >= 0
          AND NOT EXISTS (
              SELECT 1 FROM dualwrite_dead_letters d
              WHERE d.chat_id = b.chat_id AND d.resolved_at IS NULL
          )
        ORDER BY b.dirty_since
        LIMIT :extra
    ),
    picked AS MATERIALIZED (
        -- Never waits: a chat another sync holds is that sync's.
        SELECT chat_id AS id FROM candidates
        WHERE pg_try_advisory_xact_lock(:cls, hashtext(chat_id::text))
    ),
    claimed AS MATERIALIZED (
        SELECT id, true AS own FROM own UNION ALL SELECT id, false FROM picked
    ),
    held AS MATERIALIZED (
        -- A delete waits for this; a chat deleted before it is simply missing.
        SELECT c.id FROM copilot_chats c WHERE c.id IN (SELECT id FROM claimed)
        ORDER BY c.id FOR KEY SHARE OF c
    )
    SELECT cl.id, coalesce(s.wanted_version, -1), coalesce(s.applied_version, -1), cl.own,
           cl.id IN (SELECT id FROM held),
           EXISTS (SELECT 1 FROM dualwrite_dead_letters d
                   WHERE d.chat_id = cl.id AND d.resolved_at IS NULL),
           (SELECT phase FROM phase), (SELECT contracted FROM phase)
    FROM claimed cl
    LEFT JOIN copilot_chat_sync_state s ON s.chat_id = cl.id
    ORDER BY cl.id
    """
)


def claim(session: Session, own: Sequence[uuid.UUID], *, extra: int) -> Claim:
    """Lock the task's own chats (waiting for any sync of them), and up to `extra` other chats
    that are behind and not held by another sync (never waiting): one round trip, before the
    convergence takes its snapshot. Reads the phase under the lock that a phase change waits
    for, and each chat's versions."""
    rows = session.execute(
        _CLAIM,
        {"cls": SYNC_LOCK_CLASS, "own": [str(c) for c in own], "extra": extra},
    ).all()
    if not rows:  # no chat: read the phase alone
        state = session.execute(
            text("SELECT phase, contracted_at IS NOT NULL FROM dualwrite_phase FOR SHARE")
        ).one()
        return Claim(state[0], state[1], [])
    return Claim(
        rows[0][6],
        rows[0][7],
        [Claimed(r[0], int(r[1]), int(r[2]), r[3], r[4], r[5]) for r in rows],
    )
