"""SQL on the rollout phase (`dualwrite_phase`, one row), its history, and shadow mismatches.

Every mutation reads the phase with `FOR SHARE` inside its own transaction, before it touches a
chat (writers that are not this service too: the version triggers take it, see revision 0007);
a change locks the table against those share locks, so it waits for the mutations in flight and
the next ones queue behind it. No write is therefore ever applied under two phases.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.settings import Phase

_COLUMNS = "phase, since, pending, pending_since, contracted_at, now() - since"


@dataclass(frozen=True, slots=True)
class State:
    phase: Phase
    since: datetime
    pending: Phase | None  # a change that started and has not finished (or was interrupted)
    pending_since: datetime | None
    contracted_at: datetime | None
    held_seconds: float

    @property
    def contracted(self) -> bool:
        return self.contracted_at is not None


@dataclass(frozen=True, slots=True)
class Change:
    id: int
    at: datetime
    who: str
    from_phase: str
    to_phase: str
    forced: bool
    note: str | None


def _state(row: tuple[object, ...]) -> State:
    phase, since, pending, pending_since, contracted_at, held = row
    return State(
        Phase(str(phase)),
        since,  # type: ignore[arg-type]
        Phase(str(pending)) if pending else None,
        pending_since,  # type: ignore[arg-type]
        contracted_at,  # type: ignore[arg-type]
        held.total_seconds(),  # type: ignore[attr-defined]
    )


def current(session: Session) -> State:
    """The phase, without a lock (reads, status, the sweep)."""
    return _state(session.execute(text(f"SELECT {_COLUMNS} FROM dualwrite_phase")).one())


def for_mutation(session: Session) -> State:
    """The phase for a transaction that writes a chat: a change waits until it commits."""
    return _state(session.execute(text(f"SELECT {_COLUMNS} FROM dualwrite_phase FOR SHARE")).one())


def for_change(session: Session) -> State:
    """The phase, locked against every mutation until this transaction ends.

    A row lock alone could starve: a share lock on a row is granted while an update of it
    waits, so steady writers may never leave it free. `EXCLUSIVE` on the table conflicts with
    the share lockers' `ROW SHARE` and queues fairly: writers that come after it wait for it.
    Plain reads of the phase (`ACCESS SHARE`) do not wait. Run it under a short `lock_timeout`:
    every writer queues behind it while it waits."""
    session.execute(text("LOCK TABLE dualwrite_phase IN EXCLUSIVE MODE"))
    return _state(session.execute(text(f"SELECT {_COLUMNS} FROM dualwrite_phase FOR UPDATE")).one())


def set_pending(session: Session, target: Phase | None) -> None:
    session.execute(
        text(
            "UPDATE dualwrite_phase SET pending = :target, "
            "pending_since = CASE WHEN CAST(:target AS text) IS NULL THEN NULL ELSE now() END"
        ),
        {"target": target.value if target else None},
    )


def change(session: Session, *, to: Phase, who: str, forced: bool, note: str | None = None) -> None:
    """Move to `to` now and record who did it; clears any pending change."""
    session.execute(
        text(
            """
            WITH old AS (SELECT phase FROM dualwrite_phase),
            moved AS (
                UPDATE dualwrite_phase SET phase = :to, since = now(), pending = NULL,
                    pending_since = NULL
                RETURNING 1
            )
            INSERT INTO dualwrite_phase_changes (who, from_phase, to_phase, forced, note)
            SELECT :who, old.phase, :to, :forced, :note FROM old, moved
            """
        ),
        {"to": to.value, "who": who, "forced": forced, "note": note},
    )


def mark_contracted(session: Session, *, who: str) -> None:
    session.execute(
        text(
            """
            WITH moved AS (
                UPDATE dualwrite_phase SET contracted_at = now() RETURNING phase
            )
            INSERT INTO dualwrite_phase_changes (who, from_phase, to_phase, forced, note)
            SELECT :who, phase, phase, false, 'contract: JSONB column dropped' FROM moved
            """
        ),
        {"who": who},
    )


def history(session: Session, limit: int = 10) -> list[Change]:
    rows = session.execute(
        text(
            "SELECT id, at, who, from_phase, to_phase, forced, note FROM dualwrite_phase_changes "
            "ORDER BY id DESC LIMIT :limit"
        ),
        {"limit": limit},
    ).all()
    return [Change(*row) for row in rows]


def entered(session: Session, phase: Phase) -> datetime | None:
    """When the rollout last moved into `phase` (None: never, by a recorded step)."""
    value = session.execute(
        text("SELECT max(at) FROM dualwrite_phase_changes WHERE to_phase = :phase"),
        {"phase": phase.value},
    ).scalar_one()
    return value if isinstance(value, datetime) else None


def record_mismatch(session: Session, chat_id: uuid.UUID, detail: str) -> None:
    session.execute(
        text("INSERT INTO dualwrite_shadow_mismatches (chat_id, detail) VALUES (:id, :detail)"),
        {"id": chat_id, "detail": detail},
    )


def mismatches_since(session: Session, since: datetime | None) -> int:
    return int(
        session.execute(
            text(
                "SELECT count(*) FROM dualwrite_shadow_mismatches "
                "WHERE CAST(:since AS timestamptz) IS NULL OR at > :since"
            ),
            {"since": since},
        ).scalar_one()
    )
