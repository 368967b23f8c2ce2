"""Copying chats from the JSONB into `copilot_chat_messages`: the worker side of the dual-write.

A sync names a chat and the version its caller committed; it always converges the whole chat to
the JSONB as it is *now*. A duplicate, a retry, a stale or an out-of-order delivery therefore all
end in the same rows, and a delivery whose version is already applied returns without reading the
JSONB at all, which is also how a backlog of many tasks for one chat collapses into one copy.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.jobs import SYNC_CHAT
from app.repositories import chats as chats_repo
from app.repositories import dead_letters, messages, sync_state
from app.repositories import phase as phase_repo
from app.services import drift
from app.settings import Phase


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
    # Chats found merely behind (a newer JSONB version than their copy claims, and a sync on
    # its way) and the rows in which they differed: lag under live traffic, not drift. Only
    # reconciles tell them apart.
    behind: int = 0
    behind_rows: int = 0
    # Chats behind with no sync on its way (`drift.State.STALLED`): drift, their rows counted
    # in `inserted`, `updated`, `removed` like any other.
    stalled: int = 0
    picked: int = 0  # other chats behind that this sync converged too
    # Chats of which only the elements appended since their last copy were mapped.
    appended: int = 0
    # Chats whose JSONB was written by something else in `table_only`: left as they are.
    diverged: int = 0
    lag_seconds: list[float] = field(default_factory=list)

    def add(self, counts: messages.ChatCounts) -> None:
        self.chats += 1
        self.elements += counts.elements
        self.bad_elements += counts.bad_elements
        self.inserted += counts.inserted
        self.updated += counts.updated
        self.removed += counts.removed
        self.appended += counts.first > 0

    def add_checked(self, counts: messages.ChatCounts, applied: int, followed: bool = True) -> None:
        """Add a chat that a reconcile compared (see `drift.state`): differences in a chat
        whose copy does not claim to be current (`applied` below the version compared) are lag,
        not drift, as long as a sync is on its way (`followed`)."""
        kind = drift.state(counts, applied, followed)
        if kind is drift.State.BEHIND:
            self.chats += 1
            self.elements += counts.elements
            self.bad_elements += counts.bad_elements
            self.behind += 1
            self.behind_rows += counts.drift
        else:
            self.add(counts)
            self.stalled += kind is drift.State.STALLED

    @staticmethod
    def checked(
        results: Sequence[messages.ChatCounts],
        applied: dict[uuid.UUID, tuple[int, int]],
        unfollowed: Collection[uuid.UUID] = (),
    ) -> SyncReport:
        report = SyncReport()
        for counts in results:
            report.add_checked(
                counts,
                drift.applied_version(applied, counts.chat_id),
                counts.chat_id not in unfollowed,
            )
        return report


def sync_chats(
    session: Session,
    wanted: dict[uuid.UUID, int],
    *,
    task: str = SYNC_CHAT,
    extra: int = 0,
) -> SyncReport:
    """Bring the follower store of the chats in `wanted` (chat id -> version the caller saw) up
    to the source of truth, in the direction the phase says: the rows up to the JSONB, or in
    `table_only` the JSONB up to the rows. After the contract there is nothing to follow.

    With `extra`, up to that many other chats that are behind, and that no other sync holds,
    are converged in the same statement: under a backlog one task does the work of many (their
    own tasks then find them applied and return at once). Three round trips in all: the claim
    (phase, locks, versions), the convergence (which also records what it applied), the commit.

    Chats whose applied version already covers the wanted one are skipped; a chat that no longer
    exists is counted as missing and otherwise ignored (its rows went with it). Elements that
    cannot be copied are skipped, and each chat that has some gets a dead letter saying so.
    """
    report = SyncReport()
    if not wanted:
        return report
    claim = sync_state.claim(session, list(wanted), extra=extra)
    if claim.contracted:
        report.skipped = len(wanted)
        return report
    todo: list[uuid.UUID] = []
    settled: list[uuid.UUID] = []  # in sync already, with a dead letter to close
    for chat in claim.chats:
        if not chat.exists:
            report.missing += chat.own
            continue
        # Tasks coalesce: one may stand for later changes than its own version, which the
        # chat's recorded wanted version includes.
        version = max(wanted.get(chat.chat_id, -1), chat.wanted_version)
        if chat.applied_version < version:
            todo.append(chat.chat_id)
        else:
            report.skipped += chat.own
            if chat.open_letters:
                settled.append(chat.chat_id)
    report.picked = sum(1 for c in claim.chats if not c.own and c.chat_id in todo)
    if claim.phase == Phase.TABLE_ONLY.value:
        written, diverged = chats_repo.write_from_rows(session, todo)
        report.chats = len(written)
        report.diverged = len(diverged)
        dead_letters.resolve(session, [*written, *settled], [*written, *settled])
        _record_diverged(session, diverged, task=task)
        return report
    # Chats that only grew since their last copy have just the new elements copied.
    results = messages.converge(session, todo, appended=True)
    for counts in results:
        report.add(counts)
        if counts.chat_id in wanted and counts.version >= wanted[counts.chat_id]:
            lag = (counts.done_at - counts.updated_at).total_seconds()
            report.lag_seconds.append(max(0.0, lag))
    _record_bad_elements(session, results, task=task)
    if settled:
        dead_letters.resolve(session, settled, settled)
    return report


class WrongPhase(Exception):
    """The operation has no meaning in the current phase; nothing was changed."""


def resync(session: Session, chat_ids: Sequence[uuid.UUID]) -> SyncReport:
    """Converge these chats' rows to their JSONB whatever their recorded state (reconcile and
    repair). Refused once the rows are the source of truth."""
    if not chat_ids:
        return SyncReport()
    phase = phase_repo.for_mutation(session)
    if phase.phase is Phase.TABLE_ONLY or phase.contracted:
        raise WrongPhase(
            "the rows are the source of truth (table_only): copying the JSONB over them would "
            "undo writes; the reverse sync keeps the JSONB up to them"
        )
    # The chats provably in sync, whose convergence would write nothing, need neither their
    # locks nor the element-by-element convergence: on an in-sync table that is nearly all.
    # Without locks this is one snapshot, in which they were equal, as a converge would find.
    settled = messages.equal(session, chat_ids, settled=True)
    cleared = {counts.chat_id for counts in settled}
    rest = [chat_id for chat_id in chat_ids if chat_id not in cleared]
    if not rest:
        report = SyncReport()
        results: list[messages.ChatCounts] = []
    else:
        sync_state.lock_chats(session, rest)
        # Under the locks no sync moves these; a handler's newer version shows up as lag,
        # unless no sync is on its way to copy it (read before the convergence closes dead
        # letters).
        recorded = sync_state.versions(session, rest)
        unfollowed = drift.unfollowed(session, rest, phase.phase)
        results = messages.converge(session, rest)
        report = SyncReport.checked(results, recorded, unfollowed)
    for counts in settled:
        report.add(counts)
    report.missing = len(chat_ids) - len(results) - len(settled)
    _record_bad_elements(session, results, task=SYNC_CHAT)
    return report


def _record_bad_elements(
    session: Session, results: list[messages.ChatCounts], *, task: str
) -> None:
    """Report the chats copied with skipped elements (the convergence itself recorded what it
    applied and closed what it resolved)."""
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


def _record_diverged(session: Session, diverged: list[chats_repo.Diverged], *, task: str) -> None:
    """A chat whose JSONB moved on by itself in `table_only` is not rewritten from the rows
    (that would erase the write): it waits for an operator, who sees what differs."""
    for chat in diverged:
        dead_letters.record(
            session,
            task=task,
            chat_id=chat.chat_id,
            args=[str(chat.chat_id), chat.jsonb_version],
            reason=dead_letters.Reason.DIVERGED,
            error=(
                f"the JSONB is at version {chat.jsonb_version} but the rows last wrote version "
                f"{chat.applied_version}: something other than this service wrote it in "
                "table_only; the reverse sync leaves it as it is. Replay adds the elements "
                "that the rows lack to the rows, then the JSONB follows the rows again"
            ),
            attempts=1,
        )


def releaser(factory: sessionmaker[Session]) -> Callable[[list[str]], None]:
    """Releases the queued marks of chats whose syncs could not be sent (a publisher's
    `release`), in a transaction of its own."""

    def release(chats: list[str]) -> None:
        with transaction(factory) as session:
            sync_state.clear_queued(session, [uuid.UUID(chat) for chat in chats])

    return release


def sweep(
    session: Session, *, grace: timedelta, ttl: timedelta, limit: int
) -> list[sync_state.Due]:
    """Chats whose copy is behind for longer than `grace`, each marked queued unless a sync of
    it already waits (see `sync_state.mark_behind`): the caller sends a sync for each marked
    one, after the commit. Nothing in `jsonb_only` (no copy is made yet) or after the contract
    (nothing follows the rows any more).

    This is what makes a lost publish harmless: the handler's commit recorded the wanted
    version in the same transaction, whatever happened to its task. The same holds in
    `table_only`, where the follower is the JSONB.
    """
    phase = phase_repo.current(session)
    if phase.phase is Phase.JSONB_ONLY or phase.contracted:
        return []
    return sync_state.mark_behind(session, grace=grace, ttl=ttl, limit=limit)
