"""Drift between the JSONB and the table: what differs, per chat, without changing anything.

`check` and the reconcile judge a chat by the same rule (`state`), so both name the same state
with the same word: a difference is drift unless a sync is on its way to copy it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy.orm import Session

from app.repositories import chats as chats_repo
from app.repositories import dead_letters, sync_state
from app.repositories import messages as messages_repo
from app.repositories import phase as phase_repo
from app.settings import Phase


class State(StrEnum):
    """How a chat's rows stand against its JSONB."""

    IN_SYNC = "in sync"
    # Its JSONB changed after its copy and a sync is on its way (live traffic): lag.
    BEHIND = "behind"
    # Behind, but no sync is on its way: nothing copies in `jsonb_only`, and the sweep skips a
    # chat with an open blocking dead letter. Only a reconcile (or a replay) writes it: drift.
    STALLED = "stalled"
    # Its copy claims to be current and still differs.
    DRIFT = "drift"

    @property
    def is_drift(self) -> bool:
        return self in (State.DRIFT, State.STALLED)


def state(counts: messages_repo.ChatCounts, applied: int, followed: bool) -> State:
    """Judge one compared chat: `applied` is the version its copy claims (read before the
    comparison), `followed` whether a sync is on its way for a chat behind (`unfollowed`)."""
    if not counts.drift:
        return State.IN_SYNC
    if counts.version <= applied:
        return State.DRIFT
    return State.BEHIND if followed else State.STALLED


def compare(session: Session, chat_ids: Sequence[uuid.UUID]) -> list[messages_repo.ChatCounts]:
    """What differs in each of these chats, as `messages_repo.diff` counts it, in id order. The
    cheap comparison (`messages_repo.equal`) clears the chats in sync first; only the others are
    mapped element by element."""
    same = messages_repo.equal(session, chat_ids)
    cleared = {counts.chat_id for counts in same}
    rest = [chat_id for chat_id in chat_ids if chat_id not in cleared]
    return sorted([*same, *messages_repo.diff(session, rest)], key=lambda c: c.chat_id)


def unfollowed(session: Session, chat_ids: Sequence[uuid.UUID], phase: Phase) -> set[uuid.UUID]:
    """Those of these chats that no sync will copy if they fall behind: all of them in
    `jsonb_only` (no sync runs), else those with an open dead letter that keeps the sweep off
    them until an operator replays it. Read before anything closes dead letters."""
    if phase is Phase.JSONB_ONLY:
        return set(chat_ids)
    return dead_letters.chats_blocked(session, chat_ids)


@dataclass(slots=True)
class Found:
    """What `check` found: the chats in drift, each with its state, and the chats merely
    behind."""

    drifted: list[tuple[messages_repo.ChatCounts, State]] = field(default_factory=list)
    behind: int = 0
    behind_rows: int = 0  # the rows in which the chats merely behind differ

    @property
    def rows(self) -> int:
        return sum(counts.drift for counts, _ in self.drifted)

    @property
    def stalled(self) -> int:
        return sum(1 for _, kind in self.drifted if kind is State.STALLED)


def find_drift(session: Session, batch_size: int = 500) -> Found:
    """The chats whose rows differ from their JSONB with no sync on its way to fix them, with
    what differs, and how many chats differ only because their sync has not run yet."""
    found = Found()
    phase = phase_repo.current(session).phase
    after = None
    while True:
        ids = chats_repo.ids_after(session, after, batch_size)
        if not ids:
            return found
        # Versions first: a copy that claimed to be current before the diff's snapshot and
        # still differs in it is drift; a newer JSONB is lag (as in the reconcile's dry run).
        recorded = sync_state.versions(session, ids)
        stuck = unfollowed(session, ids, phase)
        for counts in compare(session, ids):
            applied = applied_version(recorded, counts.chat_id)
            kind = state(counts, applied, counts.chat_id not in stuck)
            if kind.is_drift:
                found.drifted.append((counts, kind))
            elif kind is State.BEHIND:
                found.behind += 1
                found.behind_rows += counts.drift
        after = ids[-1]


def applied_version(recorded: dict[uuid.UUID, tuple[int, int]], chat_id: uuid.UUID) -> int:
    """The version a chat's copy claims (`sync_state.versions`); -1 without a sync state."""
    return recorded.get(chat_id, (0, -1))[1]
