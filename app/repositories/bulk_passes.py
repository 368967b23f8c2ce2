"""SQL on `dualwrite_bulk_passes` and `dualwrite_bulk_chunks`: the bulk passes (backfill, rolling
full reconcile) as chunks over keyset ranges of chat ids, and the claims that keep each chunk to
one live worker and the fleet to `BULK_MAX_CONCURRENT_CHUNKS` chunks in flight.

A chunk's states: `pending` (not queued), `queued` (its task was published), `running` (a worker
holds its session lock), `done`, `failed` (gave up after `BULK_CHUNK_MAX_ATTEMPTS` claims that
did not end). A running chunk is alive exactly while its worker's connection holds the chunk's
advisory lock: a worker killed mid-chunk loses its connection, and with it the lock, so the
chunk is taken again at once by a redelivery, or queued again by the next dispatch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

# Session-level advisory lock of a running chunk: the one-bigint form, `CLASS << 32 | chunk id`,
# so pg_locks shows classid = CLASS and objid = the chunk's id (objsubid 1; the two-int keys of
# the sync and reconcile locks have objsubid 2 and never collide with it).
CHUNK_LOCK_CLASS = 7303
# Transaction-level lock that serializes dispatches across the fleet (the count-then-queue).
DISPATCH_LOCK = (7304, 1)


class Kind(StrEnum):
    BACKFILL = "backfill"
    RECONCILE = "reconcile"


@dataclass(frozen=True, slots=True)
class Chunk:
    id: int
    pass_id: int
    kind: Kind
    ordinal: int
    lo: uuid.UUID | None
    hi: uuid.UUID | None
    state: str
    cursor: uuid.UUID | None
    attempts: int
    pass_started_at: datetime


@dataclass(frozen=True, slots=True)
class PassProgress:
    id: int
    kind: Kind
    state: str
    started_at: datetime
    finished_at: datetime | None
    total_chats: int
    total_chunks: int
    released_chunks: int
    nights: int
    chunks_done: int
    chunks_failed: int
    chunks_running: int
    chats: int
    rows: int
    bad_elements: int
    bad_chats: int
    inserted: int
    updated: int
    soft_deleted: int
    behind: int
    timed_out: int
    skipped: int
    errors: int
    first_started: datetime | None
    last_finished: datetime | None
    now: datetime

    @property
    def drift(self) -> int:
        return self.inserted + self.updated + self.soft_deleted

    @property
    def complete(self) -> bool:
        """Every chunk done, every chat compared: a reconcile pass that proves the whole table."""
        return (
            self.state == "finished"
            and self.chunks_done == self.total_chunks
            and self.timed_out == 0
            and self.skipped == 0
            and self.errors == 0
        )

    @property
    def elapsed_seconds(self) -> float:
        if self.first_started is None:
            return 0.0
        end = self.finished_at or self.now
        return max(0.0, (end - self.first_started).total_seconds())


_CHUNK_COLUMNS = (
    "c.id, c.pass_id, p.kind, c.ordinal, c.lo, c.hi, c.state, c.cursor, c.attempts, p.started_at"
)

# The chunk's session lock is held by some live session of this database.
_HELD = """EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.classid = CAST(:lock_class AS oid) AND l.objid = CAST(c.id AS oid)
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)"""


def create(
    session: Session,
    kind: Kind,
    *,
    chunk_chats: int,
    started_at: datetime | None = None,
    after: uuid.UUID | None = None,
    nights: int = 1,
    trigger: str,
) -> int:
    """A new pass over the chats after `after`, cut into chunks of `chunk_chats` ids; the last
    chunk is open above, so chats created meanwhile fall in it. Its first night's share is
    released. One index-only scan of the chats' primary key."""
    pass_id = int(
        session.execute(
            text(
                "INSERT INTO dualwrite_bulk_passes (kind, started_at, total_chats, total_chunks, "
                "released_chunks, nights, trigger) "
                "VALUES (:kind, coalesce(CAST(:started_at AS timestamptz), now()), 0, 0, 0, "
                ":nights, :trigger) RETURNING id"
            ),
            {"kind": kind.value, "started_at": started_at, "nights": nights, "trigger": trigger},
        ).scalar_one()
    )
    chats, chunks = session.execute(
        text(
            """
            WITH ids AS (
                SELECT id, row_number() OVER (ORDER BY id) AS n FROM copilot_chats
                WHERE CAST(:after AS uuid) IS NULL OR id > CAST(:after AS uuid)
            ),
            his AS (
                SELECT id AS hi FROM ids WHERE n % :size = 0
                UNION ALL SELECT NULL
            ),
            numbered AS (
                SELECT hi, row_number() OVER (ORDER BY hi NULLS LAST) - 1 AS ordinal FROM his
            ),
            inserted AS (
                INSERT INTO dualwrite_bulk_chunks (pass_id, ordinal, lo, hi)
                SELECT :pass, ordinal,
                       CASE WHEN ordinal = 0 THEN CAST(:after AS uuid)
                            ELSE lag(hi) OVER (ORDER BY ordinal) END,
                       hi
                FROM numbered
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM ids), (SELECT count(*) FROM inserted)
            """
        ),
        {"after": after, "size": chunk_chats, "pass": pass_id},
    ).one()
    share = -(-int(chunks) // max(1, nights))
    session.execute(
        text(
            "UPDATE dualwrite_bulk_passes SET total_chats = :chats, total_chunks = :chunks, "
            "released_chunks = :share WHERE id = :id"
        ),
        {"chats": chats, "chunks": chunks, "share": share, "id": pass_id},
    )
    return pass_id


def open_pass(session: Session, kind: Kind) -> int | None:
    """The pass of this kind not finished yet (active, paused or failed), if any."""
    value = session.execute(
        text(
            "SELECT id FROM dualwrite_bulk_passes WHERE kind = :kind AND state <> 'finished' "
            "ORDER BY id DESC LIMIT 1"
        ),
        {"kind": kind.value},
    ).scalar_one_or_none()
    return int(value) if value is not None else None


def release_share(session: Session, pass_id: int) -> tuple[int, int]:
    """Release the next night's share of a rolling pass; (released, total) chunks."""
    released, total = session.execute(
        text(
            "UPDATE dualwrite_bulk_passes SET "
            "released_chunks = least(total_chunks, released_chunks "
            "    + (total_chunks + greatest(nights, 1) - 1) / greatest(nights, 1)) "
            "WHERE id = :id RETURNING released_chunks, total_chunks"
        ),
        {"id": pass_id},
    ).one()
    return int(released), int(total)


def retry_failed(session: Session, pass_id: int) -> int:
    """Failed chunks of this pass back to pending, their attempts reset; the pass active."""
    count = len(
        session.execute(
            text(
                "UPDATE dualwrite_bulk_chunks SET state = 'pending', attempts = 0, error = NULL "
                "WHERE pass_id = :id AND state = 'failed' RETURNING id"
            ),
            {"id": pass_id},
        ).all()
    )
    session.execute(
        text(
            "UPDATE dualwrite_bulk_passes SET state = 'active' WHERE id = :id AND state = 'failed'"
        ),
        {"id": pass_id},
    )
    return count


def lock_dispatch(session: Session) -> None:
    session.execute(
        text("SELECT pg_advisory_xact_lock(:a, :b)"),
        {"a": DISPATCH_LOCK[0], "b": DISPATCH_LOCK[1]},
    )


def reap(session: Session, *, queued_ttl_seconds: float, max_attempts: int) -> int:
    """Chunks in flight that nobody works on any more back to pending (or failed, after
    `max_attempts` claims): a queued one whose task never came within the ttl (lost with the
    broker), a running one whose worker's lock is gone (killed)."""
    return len(
        session.execute(
            text(
                f"""
                UPDATE dualwrite_bulk_chunks c SET
                    state = CASE WHEN c.attempts >= :max_attempts THEN 'failed' ELSE 'pending' END,
                    error = CASE WHEN c.attempts >= :max_attempts
                                 THEN 'gave up after ' || c.attempts || ' claims that did not end'
                                 ELSE c.error END
                WHERE (c.state = 'queued' AND c.queued_at < now() - make_interval(secs => :ttl))
                   OR (c.state = 'running' AND NOT {_HELD})
                RETURNING c.id
                """
            ),
            {
                "ttl": queued_ttl_seconds,
                "max_attempts": max_attempts,
                "lock_class": CHUNK_LOCK_CLASS,
            },
        ).all()
    )


def settle_passes(session: Session, paused_kinds: Sequence[Kind]) -> list[int]:
    """Each pass's state from its chunks and the operator's pauses; returns the passes that
    finished now."""
    session.execute(
        text(
            "UPDATE dualwrite_bulk_passes SET state = CASE "
            "WHEN kind = ANY(CAST(:paused AS text[])) THEN 'paused' ELSE 'active' END "
            "WHERE state IN ('active', 'paused') "
            "AND (state = 'paused') <> (kind = ANY(CAST(:paused AS text[])))"
        ),
        {"paused": [k.value for k in paused_kinds]},
    )
    rows = session.execute(
        text(
            """
            UPDATE dualwrite_bulk_passes p SET
                state = CASE WHEN s.failed > 0 THEN 'failed' ELSE 'finished' END,
                finished_at = CASE WHEN s.failed > 0 THEN NULL ELSE now() END
            FROM (
                SELECT pass_id,
                       count(*) FILTER (WHERE state = 'failed') AS failed,
                       count(*) FILTER (WHERE state NOT IN ('done', 'failed')) AS open
                FROM dualwrite_bulk_chunks
                WHERE pass_id IN (SELECT id FROM dualwrite_bulk_passes
                                  WHERE state IN ('active', 'paused'))
                GROUP BY pass_id
            ) s
            WHERE p.id = s.pass_id AND s.open = 0 AND p.state IN ('active', 'paused')
            RETURNING p.id, p.state
            """
        )
    ).all()
    return [int(r[0]) for r in rows if r[1] == "finished"]


def in_flight(session: Session) -> int:
    """Chunks queued or running anywhere in the fleet (after `reap`, every one of them is)."""
    return int(
        session.execute(
            text("SELECT count(*) FROM dualwrite_bulk_chunks WHERE state IN ('queued', 'running')")
        ).scalar_one()
    )


def queue_next(session: Session, limit: int) -> list[Chunk]:
    """Mark up to `limit` released, pending chunks of active passes queued; oldest pass first."""
    if limit <= 0:
        return []
    rows = session.execute(
        text(
            f"""
            WITH next AS (
                SELECT c.id FROM dualwrite_bulk_chunks c
                JOIN dualwrite_bulk_passes p ON p.id = c.pass_id
                WHERE c.state = 'pending' AND p.state = 'active'
                  AND c.ordinal < p.released_chunks
                ORDER BY c.pass_id, c.ordinal
                LIMIT :limit
            ),
            queued AS (
                UPDATE dualwrite_bulk_chunks c SET state = 'queued', queued_at = now()
                FROM next WHERE c.id = next.id
                RETURNING c.*
            )
            SELECT {_CHUNK_COLUMNS} FROM queued c
            JOIN dualwrite_bulk_passes p ON p.id = c.pass_id
            ORDER BY c.pass_id, c.ordinal
            """
        ),
        {"limit": limit},
    ).all()
    return [_chunk(row) for row in rows]


def unqueue(session: Session, chunk_ids: Sequence[int]) -> None:
    """Chunks whose task could not be published: pending again, for the next dispatch."""
    session.execute(
        text(
            "UPDATE dualwrite_bulk_chunks SET state = 'pending', queued_at = NULL "
            "WHERE id = ANY(:ids) AND state = 'queued'"
        ),
        {"ids": list(chunk_ids)},
    )


def find(session: Session, pass_id: int, ordinal: int) -> Chunk | None:
    row = session.execute(
        text(
            f"SELECT {_CHUNK_COLUMNS} FROM dualwrite_bulk_chunks c "
            "JOIN dualwrite_bulk_passes p ON p.id = c.pass_id "
            "WHERE c.pass_id = :pass AND c.ordinal = :ordinal"
        ),
        {"pass": pass_id, "ordinal": ordinal},
    ).one_or_none()
    return _chunk(row) if row else None


def try_hold(connection: Connection, chunk_id: int) -> bool:
    """Take the chunk's session lock on this connection: False when a live worker holds it."""
    return bool(
        connection.execute(
            text("SELECT pg_try_advisory_lock((CAST(:cls AS bigint) << 32) | :id)"),
            {"cls": CHUNK_LOCK_CLASS, "id": chunk_id},
        ).scalar_one()
    )


def release_hold(connection: Connection, chunk_id: int) -> None:
    connection.execute(
        text("SELECT pg_advisory_unlock((CAST(:cls AS bigint) << 32) | :id)"),
        {"cls": CHUNK_LOCK_CLASS, "id": chunk_id},
    )


def claim(session: Session, chunk_id: int, worker: str) -> Chunk | None:
    """Mark a chunk this worker holds the lock of running, counting the claim; None when there
    is nothing to do (done, failed, or its pass no longer active)."""
    row = session.execute(
        text(
            f"""
            WITH claimed AS (
                UPDATE dualwrite_bulk_chunks c SET
                    state = 'running', attempts = c.attempts + 1, worker = :worker,
                    started_at = now(), finished_at = NULL, error = NULL
                FROM dualwrite_bulk_passes p
                WHERE c.id = :id AND p.id = c.pass_id AND p.state = 'active'
                  AND c.state IN ('pending', 'queued', 'running')
                RETURNING c.*
            )
            SELECT {_CHUNK_COLUMNS} FROM claimed c JOIN dualwrite_bulk_passes p ON p.id = c.pass_id
            """
        ),
        {"id": chunk_id, "worker": worker},
    ).one_or_none()
    return _chunk(row) if row else None


def advance(
    session: Session, chunk_id: int, cursor: uuid.UUID, seconds: float, **counts: int
) -> None:
    """Record a batch: the cursor and the counts move in the batch's own transaction, so a
    batch is counted exactly once however often its chunk is taken again."""
    columns = ", ".join(f"{name} = {name} + :{name}" for name in counts)
    session.execute(
        text(
            f"UPDATE dualwrite_bulk_chunks SET cursor = :cursor, seconds = seconds + :seconds"
            f"{', ' + columns if columns else ''} WHERE id = :id"
        ),
        {"id": chunk_id, "cursor": cursor, "seconds": seconds, **counts},
    )


def give_up_claim(session: Session, chunk_id: int, *, error: str, max_attempts: int) -> None:
    """A run of the chunk raised: pending again for the next dispatch (failed after
    `max_attempts` claims), with the error for the operator."""
    session.execute(
        text(
            "UPDATE dualwrite_bulk_chunks SET error = :error, "
            "state = CASE WHEN attempts >= :max_attempts THEN 'failed' ELSE 'pending' END "
            "WHERE id = :id AND state = 'running'"
        ),
        {"id": chunk_id, "error": error[:2000], "max_attempts": max_attempts},
    )


def end(session: Session, chunk_id: int, *, state: str, error: str | None = None) -> None:
    """`done`; or `pending` when the chunk yields (its time is up, its pass paused): progress
    was made, so its claims start counting again."""
    session.execute(
        text(
            "UPDATE dualwrite_bulk_chunks SET state = :state, error = :error, "
            "finished_at = CASE WHEN :state = 'done' THEN now() ELSE finished_at END, "
            "attempts = CASE WHEN :state = 'pending' THEN 0 ELSE attempts END "
            "WHERE id = :id"
        ),
        {"id": chunk_id, "state": state, "error": error},
    )


def chat_ids(
    session: Session,
    *,
    after: uuid.UUID | None,
    hi: uuid.UUID | None,
    limit: int,
    existed_at: datetime | None = None,
) -> list[uuid.UUID]:
    """The next `limit` chat ids of a chunk after `after`, up to `hi` (open when None); with
    `existed_at`, only chats that existed then or have no sync state yet (the backfill's work,
    as the migration's `_NEXT_IDS` picks it)."""
    return list(
        session.execute(
            text(
                """
                SELECT c.id FROM copilot_chats c
                WHERE (CAST(:after AS uuid) IS NULL OR c.id > CAST(:after AS uuid))
                  AND (CAST(:hi AS uuid) IS NULL OR c.id <= CAST(:hi AS uuid))
                  AND (CAST(:existed_at AS timestamptz) IS NULL
                       OR c.created_at <= CAST(:existed_at AS timestamptz)
                       OR NOT EXISTS (SELECT 1 FROM copilot_chat_sync_state s
                                      WHERE s.chat_id = c.id))
                ORDER BY c.id LIMIT :limit
                """
            ),
            {"after": after, "hi": hi, "limit": limit, "existed_at": existed_at},
        ).scalars()
    )


def progress(session: Session, kind: Kind) -> PassProgress | None:
    """The newest pass of this kind with its chunks' totals; None when there never was one."""
    exists = session.execute(text("SELECT to_regclass('dualwrite_bulk_passes') IS NOT NULL"))
    if not exists.scalar_one():
        return None
    row = session.execute(
        text(_PROGRESS + " WHERE p.kind = :kind GROUP BY p.id ORDER BY p.id DESC LIMIT 1"),
        {"kind": kind.value},
    ).one_or_none()
    return PassProgress(*row) if row else None


def complete_reconciles(session: Session, *, started_after: datetime | None) -> list[PassProgress]:
    """Finished reconcile passes that started after `started_after` (any, if None), newest
    first."""
    rows = session.execute(
        text(
            _PROGRESS + " WHERE p.kind = 'reconcile' AND p.state = 'finished' "
            "AND (CAST(:after AS timestamptz) IS NULL OR p.started_at >= :after) "
            "GROUP BY p.id ORDER BY p.finished_at DESC LIMIT 5"
        ),
        {"after": started_after},
    ).all()
    return [PassProgress(*row) for row in rows]


def chunk_intervals(session: Session, pass_id: int) -> list[tuple[datetime, datetime]]:
    """(started, finished) of each done chunk of a pass: what ran at the same time."""
    rows = session.execute(
        text(
            "SELECT started_at, finished_at FROM dualwrite_bulk_chunks "
            "WHERE pass_id = :id AND state = 'done' ORDER BY started_at"
        ),
        {"id": pass_id},
    ).all()
    return [(r[0], r[1]) for r in rows]


_PROGRESS = """
    SELECT p.id, p.kind, p.state, p.started_at, p.finished_at, p.total_chats, p.total_chunks,
           p.released_chunks, p.nights,
           count(c.id) FILTER (WHERE c.state = 'done'),
           count(c.id) FILTER (WHERE c.state = 'failed'),
           count(c.id) FILTER (WHERE c.state = 'running'),
           CAST(coalesce(sum(c.chats), 0) AS bigint),
           CAST(coalesce(sum(c.rows), 0) AS bigint),
           CAST(coalesce(sum(c.bad_elements), 0) AS bigint),
           CAST(coalesce(sum(c.bad_chats), 0) AS bigint),
           CAST(coalesce(sum(c.inserted), 0) AS bigint),
           CAST(coalesce(sum(c.updated), 0) AS bigint),
           CAST(coalesce(sum(c.soft_deleted), 0) AS bigint),
           CAST(coalesce(sum(c.behind), 0) AS bigint),
           CAST(coalesce(sum(c.timed_out), 0) AS bigint),
           CAST(coalesce(sum(c.skipped), 0) AS bigint),
           count(c.id) FILTER (WHERE c.error IS NOT NULL),
           min(c.started_at), max(c.finished_at), now()
    FROM dualwrite_bulk_passes p LEFT JOIN dualwrite_bulk_chunks c ON c.pass_id = p.id
"""


def _chunk(row: Any) -> Chunk:
    return Chunk(
        id=int(row[0]),
        pass_id=int(row[1]),
        kind=Kind(row[2]),
        ordinal=int(row[3]),
        lo=row[4],
        hi=row[5],
        state=str(row[6]),
        cursor=row[7],
        attempts=int(row[8]),
        pass_started_at=row[9],
    )
