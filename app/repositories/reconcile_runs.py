"""SQL on `dualwrite_reconcile_runs`: one row per reconcile, so drift can be followed over time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

# The session-level advisory lock that keeps reconciles to one at a time (two int4 keys).
LOCK_KEY = (7302, 1)


@dataclass(frozen=True, slots=True)
class Run:
    id: int
    started_at: datetime
    finished_at: datetime | None
    since: timedelta | None
    dry_run: bool
    trigger: str
    outcome: str
    chats_scanned: int
    messages_scanned: int
    bad_elements: int
    inserted: int
    updated: int
    soft_deleted: int
    drift: int
    duration_seconds: float | None
    error: str | None
    chats_timed_out: int
    chats_skipped: int
    chats_behind: int


_COLUMNS = (
    "id, started_at, finished_at, since, dry_run, trigger, outcome, chats_scanned, "
    "messages_scanned, bad_elements, inserted, updated, soft_deleted, drift, duration_seconds, "
    "error, chats_timed_out, chats_skipped, chats_behind"
)

# True while some session of this database holds the reconcile lock.
_LOCK_HELD = """EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND classid = CAST(:lock_a AS oid) AND objid = CAST(:lock_b AS oid)
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
)"""
_LOCK_PARAMS = {"lock_a": LOCK_KEY[0], "lock_b": LOCK_KEY[1]}


def try_lock(connection: Connection) -> bool:
    """Take the reconcile lock for this connection's session, if nobody holds it."""
    return bool(
        connection.execute(
            text("SELECT pg_try_advisory_lock(:lock_a, :lock_b)"), _LOCK_PARAMS
        ).scalar_one()
    )


def unlock(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_unlock(:lock_a, :lock_b)"), _LOCK_PARAMS)


def limit_transaction(session: Session, *, statement_timeout_ms: int, lock_timeout_ms: int) -> None:
    """The reconcile's own limits, for the rest of this transaction only (`SET LOCAL`)."""
    session.execute(
        text(
            "SELECT set_config('statement_timeout', :statement, true), "
            "set_config('lock_timeout', :lock, true)"
        ),
        {"statement": f"{statement_timeout_ms}ms", "lock": f"{lock_timeout_ms}ms"},
    )


def mark_killed(session: Session) -> list[int]:
    """Close the runs still `running`: called by a run holding the lock, so none of them is
    alive (the lock is its run's session lock, released when that process or connection died)."""
    return list(
        session.execute(
            text(
                """
                UPDATE dualwrite_reconcile_runs SET
                    outcome = 'killed', finished_at = now(),
                    error = 'found unfinished by a later run: its process or connection died '
                            'before it recorded an outcome; its totals are what it had recorded'
                WHERE outcome = 'running'
                RETURNING id
                """
            )
        ).scalars()
    )


def start(session: Session, *, since: timedelta | None, dry_run: bool, trigger: str) -> int:
    return int(
        session.execute(
            text(
                "INSERT INTO dualwrite_reconcile_runs (since, dry_run, trigger) "
                "VALUES (:since, :dry_run, :trigger) RETURNING id"
            ),
            {"since": since, "dry_run": dry_run, "trigger": trigger},
        ).scalar_one()
    )


def finish(
    session: Session, run_id: int, *, outcome: str, error: str | None, **totals: Any
) -> None:
    session.execute(
        text(
            """
            UPDATE dualwrite_reconcile_runs SET
                finished_at = now(), outcome = :outcome, error = :error,
                chats_scanned = :chats_scanned, messages_scanned = :messages_scanned,
                bad_elements = :bad_elements, inserted = :inserted, updated = :updated,
                soft_deleted = :soft_deleted, drift = :drift,
                chats_timed_out = :chats_timed_out, chats_skipped = :chats_skipped,
                chats_behind = :chats_behind,
                duration_seconds = :duration_seconds
            WHERE id = :id
            """
        ),
        {"id": run_id, "outcome": outcome, "error": error, **totals},
    )


def last_finished(session: Session, *, whole: bool = False) -> Run | None:
    """The run that finished last (with `whole`, of those over every chat, no `--since`); a
    killed one is left out (its `finished_at` is when a later run found it, not when it
    stopped)."""
    row = session.execute(
        text(
            f"SELECT {_COLUMNS} FROM dualwrite_reconcile_runs WHERE finished_at IS NOT NULL "
            "AND outcome <> 'killed' AND (NOT :whole OR since IS NULL) "
            "ORDER BY finished_at DESC LIMIT 1"
        ),
        {"whole": whole},
    ).one_or_none()
    return Run(*row) if row else None


def recent(session: Session, limit: int = 10) -> list[Run]:
    """The newest runs. One still `running` while nobody holds the reconcile lock is dead and
    shows as `killed` already, before the next run records it so."""
    columns = _COLUMNS.replace(
        "outcome,",
        f"CASE WHEN outcome = 'running' AND NOT {_LOCK_HELD} THEN 'killed' ELSE outcome END,",
    )
    rows = session.execute(
        text(f"SELECT {columns} FROM dualwrite_reconcile_runs ORDER BY id DESC LIMIT :limit"),
        {"limit": limit, **_LOCK_PARAMS},
    ).all()
    return [Run(*row) for row in rows]
