"""SQL on `dualwrite_bulk_paused`: the scheduled bulk passes an operator has paused.

A row per paused pass; no row, the pass runs. The scheduled task reads it at its start (see
`tasks.maintenance`); `python -m app bulk` and the rollout page write it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.orm import Session


class Pass(StrEnum):
    """The scheduled bulk passes, named as in beat's schedule (`celeryconfig.beat_schedule`)."""

    RECONCILE_NIGHTLY = "reconcile-nightly"  # every chat, on RECONCILE_CRONTAB
    RECONCILE_RECENT = "reconcile-recent"  # chats changed in the recent window, often
    BACKFILL = "backfill"  # the fleet backfill's chunks (BACKFILL_ON_WORKERS)


@dataclass(frozen=True, slots=True)
class Paused:
    name: Pass
    paused_at: datetime
    paused_by: str


def paused(session: Session) -> dict[Pass, Paused]:
    """The passes paused now; a name this release does not know is left out."""
    rows = session.execute(
        text("SELECT pass, paused_at, paused_by FROM dualwrite_bulk_paused ORDER BY pass")
    ).all()
    known = {p.value: p for p in Pass}
    return {known[row[0]]: Paused(known[row[0]], row[1], row[2]) for row in rows if row[0] in known}


def is_paused(session: Session, name: Pass) -> Paused | None:
    return paused(session).get(name)


def pause(session: Session, names: Sequence[Pass], *, who: str) -> list[Pass]:
    """Pause these passes; returns those that were running (a paused one keeps who paused it)."""
    rows = session.execute(
        text(
            "INSERT INTO dualwrite_bulk_paused (pass, paused_by) "
            "SELECT unnest(CAST(:names AS text[])), :who "
            "ON CONFLICT (pass) DO NOTHING RETURNING pass"
        ),
        {"names": [n.value for n in names], "who": who},
    ).scalars()
    return sorted(Pass(name) for name in rows)


def resume(session: Session, names: Sequence[Pass]) -> list[Pass]:
    """Resume these passes; returns those that were paused."""
    rows = session.execute(
        text("DELETE FROM dualwrite_bulk_paused WHERE pass = ANY(:names) RETURNING pass"),
        {"names": [n.value for n in names]},
    ).scalars()
    return sorted(Pass(name) for name in rows)
