"""Drift between the JSONB and the table: what differs, per chat, without changing anything."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.repositories import chats as chats_repo
from app.repositories import messages as messages_repo


def find_drift(session: Session, batch_size: int = 500) -> list[messages_repo.ChatCounts]:
    """The chats whose rows differ from their JSONB, with what differs."""
    drifted: list[messages_repo.ChatCounts] = []
    after = None
    while True:
        ids = chats_repo.ids_after(session, after, batch_size)
        if not ids:
            return drifted
        drifted.extend(c for c in messages_repo.diff(session, ids) if c.drift)
        after = ids[-1]
