"""Reads `dualwrite_backfill`, the state that `alembic upgrade head`'s backfill keeps (see
`migrations/backfill.py`); the contract drops the table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

# The row of the copy of `copilot_chats.messages` (`migrations.backfill.NAME`).
NAME = "copilot_chat_messages"


@dataclass(frozen=True, slots=True)
class Progress:
    started_at: datetime
    finished_at: datetime | None
    total_chats: int
    chats_done: int
    rows_copied: int
    bad_elements: int
    bad_chats: int

    @property
    def percent(self) -> float:
        return (
            100.0 * min(self.chats_done, self.total_chats) / self.total_chats
            if self.total_chats
            else 100.0
        )


def progress(session: Session) -> Progress | None:
    """The backfill's state; None when it never started, or the contract dropped its table."""
    exists = session.execute(text("SELECT to_regclass('dualwrite_backfill') IS NOT NULL"))
    if not exists.scalar_one():
        return None
    row = session.execute(
        text(
            "SELECT started_at, finished_at, total_chats, chats_done, rows_copied, bad_elements, "
            "bad_chats FROM dualwrite_backfill WHERE name = :name"
        ),
        {"name": NAME},
    ).one_or_none()
    return Progress(*row) if row else None
