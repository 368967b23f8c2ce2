"""SQL on `copilot_chat_sync_state`: which version of each chat the table reflects."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, UUID
from sqlalchemy.orm import Session

from app.repositories.dead_letters import BLOCKING

# Advisory lock class for per-chat syncs (the key is a hash of the chat id).
SYNC_LOCK_CLASS = 7301


@dataclass(frozen=True, slots=True)
class Behind:
    chat_id: uuid.UUID
    wanted_version: int


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


def mark_applied(session: Session, versions: dict[uuid.UUID, int]) -> None:
    """Record the versions just copied; never moves a chat's applied version backwards."""
    if not versions:
        return
    ids = sorted(versions)
    session.execute(
        text(
            """
            INSERT INTO copilot_chat_sync_state AS s
                (chat_id, wanted_version, applied_version, synced_at)
            SELECT v.chat_id, v.version, v.version, now()
            FROM unnest(:ids, :versions) AS v(chat_id, version)
            JOIN copilot_chats c ON c.id = v.chat_id
            ORDER BY v.chat_id
            ON CONFLICT (chat_id) DO UPDATE SET
                applied_version = greatest(s.applied_version, EXCLUDED.applied_version),
                wanted_version = greatest(s.wanted_version, EXCLUDED.applied_version),
                synced_at = now()
            """
        ).bindparams(
            bindparam("ids", type_=ARRAY(UUID(as_uuid=True))),
            bindparam("versions", type_=ARRAY(BIGINT)),
        ),
        {"ids": ids, "versions": [versions[i] for i in ids]},
    )


def list_behind(session: Session, *, grace: timedelta, limit: int) -> list[Behind]:
    """Chats whose newest version is not copied yet and has waited longer than `grace`, the
    longest-waiting first.

    Only reads: `dirty_since` keeps saying since when each chat has been behind, which is what
    `oldest_behind_seconds` reports. A chat whose sync already waits in the queue is not sent
    twice: the publisher's per-chat marker coalesces it. Skips chats with an open failed or
    worker-lost dead letter: those wait for an operator's replay. Reads only the partial index
    over `applied_version < wanted_version`, which is empty when everything is in sync.
    """
    rows = session.execute(
        text(
            """
            SELECT b.chat_id, b.wanted_version FROM copilot_chat_sync_state b
            WHERE b.applied_version < b.wanted_version
              AND b.dirty_since < now() - :grace
              AND NOT EXISTS (
                  SELECT 1 FROM dualwrite_dead_letters d
                  WHERE d.chat_id = b.chat_id AND d.resolved_at IS NULL
                    AND d.reason = ANY(:blocking)
              )
            ORDER BY b.dirty_since
            LIMIT :limit
            """
        ),
        {"grace": grace, "limit": limit, "blocking": list(BLOCKING)},
    ).all()
    return [Behind(row.chat_id, row.wanted_version) for row in rows]


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


def behind_ids(session: Session, *, limit: int) -> dict[uuid.UUID, int]:
    """Up to `limit` chats that are behind, dead-lettered or not: chat id -> wanted version."""
    rows = session.execute(
        text(
            "SELECT chat_id, wanted_version FROM copilot_chat_sync_state "
            "WHERE applied_version < wanted_version ORDER BY chat_id LIMIT :limit"
        ),
        {"limit": limit},
    ).all()
    return {row.chat_id: row.wanted_version for row in rows}


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
