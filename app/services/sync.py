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
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from app.jobs import SYNC_CHAT
from app.repositories import dead_letters, messages, sync_state


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


def sync_chats(
    session: Session, wanted: dict[uuid.UUID, int], *, task: str = SYNC_CHAT
) -> SyncReport:
    """Converge the chats in `wanted` (chat id -> version the caller saw) to their JSONB.

    Chats whose applied version already covers the wanted one are skipped; a chat that no longer
    exists is counted as missing and otherwise ignored (its rows went with it). Elements that
    cannot be copied are skipped, and each chat that has some gets a dead letter saying so.
    """
    report = SyncReport()
    if not wanted:
        return report
    sync_state.lock_chats(session, list(wanted))
    # Tasks coalesce: one may stand for later changes than its own version, which the chat's
    # recorded wanted version includes.
    recorded = sync_state.versions(session, list(wanted))
    todo = []
    for chat, version in wanted.items():
        wanted_now, applied = recorded.get(chat, (version, -1))
        if applied < max(version, wanted_now):
            todo.append(chat)
    report.skipped = len(wanted) - len(todo)
    results = messages.converge(session, todo)
    now = datetime.now(UTC)
    for counts in results:
        report.add(counts)
        if counts.version >= wanted[counts.chat_id]:
            report.lag_seconds.append(max(0.0, (now - counts.updated_at).total_seconds()))
    report.missing = len(todo) - len(results)
    _settle(session, results, task=task, synced=list(wanted))
    return report


def resync(session: Session, chat_ids: Sequence[uuid.UUID]) -> SyncReport:
    """Converge these chats whatever their recorded state (reconcile and repair)."""
    report = SyncReport()
    if not chat_ids:
        return report
    sync_state.lock_chats(session, chat_ids)
    results = messages.converge(session, chat_ids)
    for counts in results:
        report.add(counts)
    report.missing = len(chat_ids) - len(results)
    _settle(session, results, task=SYNC_CHAT, synced=[c.chat_id for c in results])
    return report


def _settle(
    session: Session,
    results: list[messages.ChatCounts],
    *,
    task: str,
    synced: Sequence[uuid.UUID],
) -> None:
    """Record what was applied, report skipped elements, close dead letters now resolved."""
    sync_state.mark_applied(session, {c.chat_id: c.version for c in results})
    for counts in results:
        if counts.bad_elements:
            dead_letters.record(
                session,
                task=task,
                chat_id=counts.chat_id,
                args=[str(counts.chat_id), counts.version],
                reason=dead_letters.Reason.BAD_ELEMENTS,
                error=(
                    f"{counts.bad_elements} of {counts.elements} elements skipped: not an "
                    "object, or no id that is a non-empty string of at most 1024 bytes"
                ),
                attempts=1,
            )
    clean = [c.chat_id for c in results if not c.bad_elements]
    dead_letters.resolve(session, synced, clean)


def sweep(session: Session, *, grace: timedelta, limit: int) -> list[sync_state.Behind]:
    """Chats whose copy is behind for longer than `grace`: the caller enqueues a sync for each,
    coalesced per chat with any sync already waiting.

    This is what makes a lost publish harmless: the handler's commit recorded the wanted
    version in the same transaction, whatever happened to its task.
    """
    return sync_state.list_behind(session, grace=grace, limit=limit)
