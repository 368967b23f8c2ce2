"""SQL on `dualwrite_dead_letters`: syncs that gave up, kept for operators to list and replay."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session


class Reason(StrEnum):
    FAILED = "failed"  # a permanent error, or a transient one past the retry limit
    WORKER_LOST = "worker_lost"  # its worker died under it more often than allowed
    BAD_ELEMENTS = "bad_elements"  # the chat was copied, but some elements were skipped
    # A reconcile gave up on the chat alone: it waited past the reconcile's lock timeout (a sync
    # held the chat) or ran past its statement timeout.
    RECONCILE_TIMEOUT = "reconcile_timeout"
    # In `table_only`, the chat's JSONB was written by something other than this service (the
    # triggers refuse that; a writer that bypasses them): the reverse sync leaves it alone.
    DIVERGED = "diverged"


# Reasons that stop the sweep from re-enqueueing a chat until an operator replays it.
# `reconcile_timeout` is not one: the timeout says nothing against the chat's own sync (a lock
# held by a sync means one is running), so the sweep, the next sync or the next reconcile may
# well succeed, and any success closes it.
BLOCKING = (Reason.FAILED.value, Reason.WORKER_LOST.value, Reason.DIVERGED.value)
# Reasons a successful sync of the chat closes.
RESOLVED_BY_SYNC = (
    Reason.FAILED.value,
    Reason.WORKER_LOST.value,
    Reason.RECONCILE_TIMEOUT.value,
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    task: str
    chat_id: uuid.UUID
    args: Any
    reason: str
    error: str
    attempts: int
    first_seen: datetime
    last_seen: datetime
    replayed_at: datetime | None
    resolved_at: datetime | None


_COLUMNS = (
    "id, task, chat_id, args, reason, error, attempts, first_seen, last_seen, replayed_at, "
    "resolved_at"
)


def record(
    session: Session,
    *,
    task: str,
    chat_id: uuid.UUID,
    args: Sequence[Any],
    reason: Reason,
    error: str,
    attempts: int,
) -> int:
    """Open a dead letter, or add to the open one of the same chat and reason."""
    return int(
        session.execute(
            text(
                """
                INSERT INTO dualwrite_dead_letters AS d
                    (task, chat_id, args, reason, error, attempts)
                VALUES (:task, :chat_id, CAST(:args AS jsonb), :reason, :error, :attempts)
                ON CONFLICT (chat_id, reason) WHERE resolved_at IS NULL DO UPDATE SET
                    task = EXCLUDED.task,
                    args = EXCLUDED.args,
                    error = EXCLUDED.error,
                    attempts = d.attempts + EXCLUDED.attempts,
                    last_seen = now()
                RETURNING id
                """
            ),
            {
                "task": task,
                "chat_id": chat_id,
                "args": json.dumps(list(args)),
                "reason": reason.value,
                "error": error[:4000],
                "attempts": attempts,
            },
        ).scalar_one()
    )


def resolve(
    session: Session, synced: Sequence[uuid.UUID], without_bad_elements: Sequence[uuid.UUID]
) -> int:
    """Close the open dead letters of chats that have just synced cleanly."""
    if not synced:
        return 0
    result = session.execute(
        text(
            """
            UPDATE dualwrite_dead_letters SET resolved_at = now()
            WHERE resolved_at IS NULL
              AND ((chat_id = ANY(:synced) AND reason = ANY(:reasons))
                   OR (chat_id = ANY(:clean) AND reason = :bad))
            """
        ).bindparams(
            bindparam("synced", type_=ARRAY(UUID(as_uuid=True))),
            bindparam("clean", type_=ARRAY(UUID(as_uuid=True))),
        ),
        {
            "synced": list(synced),
            "clean": list(without_bad_elements),
            "reasons": list(RESOLVED_BY_SYNC),
            "bad": Reason.BAD_ELEMENTS.value,
        },
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def chats_blocked(session: Session, chat_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Those of these chats that the sweep skips: an open dead letter of a `BLOCKING` reason."""
    if not chat_ids:
        return set()
    rows = session.execute(
        text(
            "SELECT DISTINCT chat_id FROM dualwrite_dead_letters "
            "WHERE resolved_at IS NULL AND reason = ANY(:blocking) AND chat_id = ANY(:ids)"
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"blocking": list(BLOCKING), "ids": list(chat_ids)},
    ).scalars()
    return set(rows)


def chats_with_open(
    session: Session, chat_ids: Sequence[uuid.UUID], reason: Reason
) -> set[uuid.UUID]:
    """Those of these chats that have an open dead letter for this reason."""
    if not chat_ids:
        return set()
    rows = session.execute(
        text(
            "SELECT chat_id FROM dualwrite_dead_letters "
            "WHERE resolved_at IS NULL AND reason = :reason AND chat_id = ANY(:ids)"
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"reason": reason.value, "ids": list(chat_ids)},
    ).scalars()
    return set(rows)


def open_reasons(session: Session, chat_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Of these chats, those with an open dead letter, and its reason (one per chat)."""
    if not chat_ids:
        return {}
    rows = session.execute(
        text(
            "SELECT DISTINCT ON (chat_id) chat_id, reason FROM dualwrite_dead_letters "
            "WHERE resolved_at IS NULL AND chat_id = ANY(:ids) ORDER BY chat_id, id"
        ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
        {"ids": list(chat_ids)},
    ).all()
    return {row[0]: row[1] for row in rows}


def list_(
    session: Session, *, include_resolved: bool = False, limit: int = 100
) -> list[DeadLetter]:
    rows = session.execute(
        text(
            f"SELECT {_COLUMNS} FROM dualwrite_dead_letters "
            "WHERE :all OR resolved_at IS NULL ORDER BY id LIMIT :limit"
        ),
        {"all": include_resolved, "limit": limit},
    ).all()
    return [DeadLetter(*row) for row in rows]


def get_open(
    session: Session,
    ids: Sequence[int] | None,
    *,
    limit: int | None = None,
    through: int | None = None,
) -> list[DeadLetter]:
    """Open dead letters with these ids (all open ones for None), none past id `through` if
    given, the first `limit` of them by id (all for None)."""
    rows = session.execute(
        text(
            f"SELECT {_COLUMNS} FROM dualwrite_dead_letters WHERE resolved_at IS NULL "
            "AND (CAST(:ids AS bigint[]) IS NULL OR id = ANY(CAST(:ids AS bigint[]))) "
            "AND (CAST(:through AS bigint) IS NULL OR id <= CAST(:through AS bigint)) "
            "ORDER BY id LIMIT CAST(:limit AS bigint)"
        ),
        {"ids": list(ids) if ids is not None else None, "limit": limit, "through": through},
    ).all()
    return [DeadLetter(*row) for row in rows]


def newest_open_id(session: Session) -> int | None:
    """The highest id of an open dead letter (None when none is open)."""
    newest: int | None = session.execute(
        text("SELECT max(id) FROM dualwrite_dead_letters WHERE resolved_at IS NULL")
    ).scalar_one()
    return newest


def mark_replayed(session: Session, ids: Sequence[int]) -> None:
    session.execute(
        text("UPDATE dualwrite_dead_letters SET replayed_at = now() WHERE id = ANY(:ids)"),
        {"ids": list(ids)},
    )


def count_open(session: Session) -> dict[str, int]:
    rows = session.execute(
        text(
            "SELECT reason, count(*) FROM dualwrite_dead_letters "
            "WHERE resolved_at IS NULL GROUP BY reason"
        )
    ).all()
    return {row[0]: int(row[1]) for row in rows}


def close(session: Session, ids: Sequence[int]) -> None:
    """Resolve these dead letters now (their chat is gone: nothing is left to copy)."""
    session.execute(
        text(
            "UPDATE dualwrite_dead_letters SET resolved_at = now() "
            "WHERE id = ANY(:ids) AND resolved_at IS NULL"
        ),
        {"ids": list(ids)},
    )
