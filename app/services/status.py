"""What an operator (and `/metrics`) wants to know about the dual-write at a glance."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.repositories import dead_letters, reconcile_runs, sync_state
from app.repositories import phase as phase_repo
from app.services import phase as phase_service
from app.settings import Phase, get_settings


def phase_state(session: Session) -> dict[str, Any]:
    """The phase, how long it has held, the gates of the next step, the reverse backlog."""
    state = phase_repo.current(session)
    following = None if state.contracted else phase_service.next_forward(state.phase)
    gates = (
        phase_service.gates(session, get_settings(), state, following)
        if following is not None
        else []
    )
    # In table_only the JSONB follows the rows; after the contract nothing follows them.
    reverse = state.phase is Phase.TABLE_ONLY and not state.contracted
    return {
        "phase": state.phase.value,
        "phases": [p.value for p in Phase],
        "contracted": state.contracted,
        "held_seconds": state.held_seconds,
        "pending": state.pending.value if state.pending else None,
        "next": following.value if following else None,
        "gates": [{"name": g.name, "ok": g.ok, "detail": g.detail} for g in gates],
        "reverse_backlog": sync_state.count_behind(session) if reverse else 0,
    }


def database_gauges(session: Session) -> dict[str, Any]:
    last = reconcile_runs.last_finished(session)
    phase = phase_state(session)
    # After the contract nothing follows the rows: the sync state's versions still move with
    # every write, but no copy is behind, and a lag gauge must not grow for ever.
    following = not phase["contracted"]
    return {
        "phase": phase,
        "chats_behind": sync_state.count_behind(session) if following else 0,
        "oldest_behind_seconds": sync_state.oldest_behind_seconds(session) if following else 0.0,
        "dead_letters_open": dead_letters.count_open(session),
        "last_reconcile": (
            {"drift": last.drift, "finished_at": last.finished_at, "outcome": last.outcome}
            if last is not None
            else None
        ),
    }
