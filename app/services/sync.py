"""Copying chats from the JSONB into `copilot_chat_messages`: the worker side of the dual-write.

A sync names a chat and the version its caller committed; it always converges the whole chat to
the JSONB as it is *now*. A duplicate, a retry, a stale or an out-of-order delivery therefore all
end in the same rows, and a delivery whose version is already applied returns without reading the
JSONB at all, which is also how a backlog of many tasks for one chat collapses into one copy.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.repositories import messages, sync_state


@dataclass(slots=True)
class SyncReport:
    """Totals over the chats of one sync."""

    chats: int = 0
    skipped: int = 0  # deliveries whose version was already applied
    missing: int = 0  # chats that no longer exist
    elements: int = 0
    bad_elements: int = 0
    inserted: int = 0
    updated: int = 0
    removed: int = 0
    lag_seconds: list[float] = field(default_factory=list)

    def add(self, counts: messages.ChatCounts) -> None:
        self.chats += 1
        self.elements += counts.elements
        self.bad_elements += counts.bad_elements
        self.inserted += counts.inserted
        self.updated += counts.updated
        self.removed += counts.removed


def sync_chats(session: Session, wanted: dict[uuid.UUID, int]) -> SyncReport:
    """Converge the chats in `wanted` (chat id -> version the caller saw) to their JSONB.

    Chats whose applied version already covers the wanted one are skipped; a chat that no longer
    exists is counted as missing and otherwise ignored (its rows went with it).
    """
    report = SyncReport()
    if not wanted:
        return report
    sync_state.lock_chats(session, list(wanted))
    applied = sync_state.applied_versions(session, list(wanted))
    todo = [c for c, v in wanted.items() if applied.get(c, -1) < v]
    report.skipped = len(wanted) - len(todo)
    results = messages.converge(session, todo)
    now = datetime.now(UTC)
    for counts in results:
        report.add(counts)
        if counts.version >= wanted[counts.chat_id]:
            report.lag_seconds.append(max(0.0, (now - counts.updated_at).total_seconds()))
    report.missing = len(todo) - len(results)
    sync_state.mark_applied(session, {c.chat_id: c.version for c in results})
    return report


def sync_chat(session: Session, chat_id: uuid.UUID, version: int) -> SyncReport:
    return sync_chats(session, {chat_id: version})


def resync_all(session: Session, chat_ids: Sequence[uuid.UUID]) -> SyncReport:
    """Converge these chats whatever their recorded state (reconcile and repair)."""
    report = SyncReport()
    if not chat_ids:
        return report
    sync_state.lock_chats(session, chat_ids)
    results = messages.converge(session, chat_ids)
    for counts in results:
        report.add(counts)
    report.missing = len(chat_ids) - len(results)
    sync_state.mark_applied(session, {c.chat_id: c.version for c in results})
    return report
