"""Replaying dead letters: enqueue a fresh sync of each chat; the sync closes the record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.jobs import SYNC_CHAT, JobQueue
from app.repositories import dead_letters, sync_state


@dataclass(frozen=True, slots=True)
class Replayed:
    letter: dead_letters.DeadLetter
    action: str  # "enqueued" or "closed: chat deleted"


def replay(session: Session, jobs: JobQueue, ids: Sequence[int] | None) -> list[Replayed]:
    """Replay the open dead letters with these ids (every open one for None).

    A whole-chat sync at the chat's newest version is enqueued; it marks the dead letter
    resolved once it succeeds. A dead letter whose chat was deleted is closed at once.
    """
    letters = dead_letters.get_open(session, ids)
    recorded = sync_state.versions(session, [d.chat_id for d in letters])
    wanted = {chat: versions[0] for chat, versions in recorded.items()}
    done: list[Replayed] = []
    gone: list[int] = []
    for letter in letters:
        if letter.chat_id in wanted:
            jobs.enqueue(SYNC_CHAT, str(letter.chat_id), wanted[letter.chat_id])
            done.append(Replayed(letter, "enqueued"))
        else:
            gone.append(letter.id)
            done.append(Replayed(letter, "closed: chat deleted"))
    dead_letters.close(session, gone)
    dead_letters.mark_replayed(session, [d.letter.id for d in done])
    return done
