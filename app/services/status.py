"""What an operator (and `/metrics`) wants to know about the dual-write at a glance."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.repositories import dead_letters, reconcile_runs, sync_state


def database_gauges(session: Session) -> dict[str, Any]:
    last = reconcile_runs.last_finished(session)
    return {
        "chats_behind": sync_state.count_behind(session),
        "oldest_behind_seconds": sync_state.oldest_behind_seconds(session),
        "dead_letters_open": dead_letters.count_open(session),
        "last_reconcile": (
            {"drift": last.drift, "finished_at": last.finished_at, "outcome": last.outcome}
            if last is not None
            else None
        ),
    }
