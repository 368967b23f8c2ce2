"""SQL on `dualwrite_reconcile_runs`: one row per reconcile, so drift can be followed over time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session


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


_COLUMNS = (
    "id, started_at, finished_at, since, dry_run, trigger, outcome, chats_scanned, "
    "messages_scanned, bad_elements, inserted, updated, soft_deleted, drift, duration_seconds, "
    "error"
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
                duration_seconds = :duration_seconds
            WHERE id = :id
            """
        ),
        {"id": run_id, "outcome": outcome, "error": error, **totals},
    )


def last_finished(session: Session) -> Run | None:
    row = session.execute(
        text(
            f"SELECT {_COLUMNS} FROM dualwrite_reconcile_runs WHERE finished_at IS NOT NULL "
            "ORDER BY finished_at DESC LIMIT 1"
        )
    ).one_or_none()
    return Run(*row) if row else None


def recent(session: Session, limit: int = 10) -> list[Run]:
    rows = session.execute(
        text(f"SELECT {_COLUMNS} FROM dualwrite_reconcile_runs ORDER BY id DESC LIMIT :limit"),
        {"limit": limit},
    ).all()
    return [Run(*row) for row in rows]
