"""Replaying dead letters: run the chat's sync again, and say what came of it.

A sync that failed or whose worker was lost is enqueued again at the chat's newest version; that
sync closes the record once it succeeds. A `bad_elements` letter is different: its chat was
copied, only some elements could not be, so a queued sync would find the chat in sync and skip it.
That chat is converged again here, in the caller's transaction, and the letter is closed when no
element is skipped any more, or kept open with the new count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.jobs import SYNC_CHAT, JobQueue
from app.repositories import dead_letters, sync_state, transcript_rows
from app.repositories import phase as phase_repo
from app.services import sync
from app.settings import Phase


@dataclass(frozen=True, slots=True)
class Replayed:
    letter: dead_letters.DeadLetter
    # "enqueued", "closed: chat deleted", "converged: no element skipped any more; resolved",
    # "converged: N of M elements still skipped; stays open", ...
    action: str


def replay(
    session: Session, jobs: JobQueue, ids: Sequence[int] | None, *, through: int | None = None
) -> list[Replayed]:
    """Replay the open dead letters with these ids (every open one for None), none past id
    `through` if given (what an operator was shown before confirming "replay all").

    A dead letter whose chat was deleted is closed at once: nothing is left to copy.
    """
    letters = dead_letters.get_open(session, ids, through=through)
    recorded = sync_state.versions(session, [d.chat_id for d in letters])
    wanted = {chat: versions[0] for chat, versions in recorded.items()}
    phase = phase_repo.current(session)
    closed: list[Replayed] = []
    if phase.phase is Phase.TABLE_ONLY or phase.contracted:
        # The rows are the source of truth: elements the table could not hold are no longer
        # part of the transcript, and the reverse sync writes the JSONB without them.
        moot = [d for d in letters if d.reason == dead_letters.Reason.BAD_ELEMENTS]
        letters = [d for d in letters if d.reason != dead_letters.Reason.BAD_ELEMENTS]
        dead_letters.close(session, [d.id for d in moot])
        closed = [Replayed(d, "closed: the rows are the source of truth now") for d in moot]
    diverged = [d for d in letters if d.reason == dead_letters.Reason.DIVERGED]
    letters = [d for d in letters if d.reason != dead_letters.Reason.DIVERGED]
    for letter in diverged:
        closed.append(_adopt(session, jobs, letter))
    bad = sorted(
        {
            d.chat_id
            for d in letters
            if d.reason == dead_letters.Reason.BAD_ELEMENTS and d.chat_id in wanted
        }
    )
    # Chat by chat, for the counts of each; `resync` records the new count on the open letter,
    # or resolves it.
    counts = {chat: sync.resync(session, [chat]) for chat in bad}
    done: list[Replayed] = []
    gone: list[int] = []
    for letter in letters:
        if letter.chat_id not in wanted or (
            letter.chat_id in counts and counts[letter.chat_id].missing
        ):
            gone.append(letter.id)
            done.append(Replayed(letter, "closed: chat deleted"))
        elif letter.chat_id in counts and letter.reason != dead_letters.Reason.BAD_ELEMENTS:
            # The chat's bad_elements replay just converged it, which closed this one too.
            done.append(Replayed(letter, "converged with the chat's bad_elements replay; resolved"))
        elif letter.chat_id in counts:
            chat = counts[letter.chat_id]
            action = (
                f"converged: {chat.bad_elements} of {chat.elements} elements still skipped; "
                "stays open"
                if chat.bad_elements
                else "converged: no element skipped any more; resolved"
            )
            done.append(Replayed(letter, action))
        else:
            jobs.enqueue(SYNC_CHAT, str(letter.chat_id), wanted[letter.chat_id])
            done.append(Replayed(letter, "enqueued"))
    dead_letters.close(session, gone)
    dead_letters.mark_replayed(session, [d.letter.id for d in [*closed, *done]])
    return closed + done


def _adopt(session: Session, jobs: JobQueue, letter: dead_letters.DeadLetter) -> Replayed:
    """A chat whose JSONB was written by something else in `table_only`: the elements the rows
    lack join the rows, then the JSONB follows the rows again."""
    dead_letters.close(session, [letter.id])
    phase = phase_repo.for_mutation(session)  # a step waits for this transaction
    if phase.phase is not Phase.TABLE_ONLY or phase.contracted:
        return Replayed(letter, "closed: the JSONB no longer follows the rows")
    sync_state.lock_chats(session, [letter.chat_id])
    added = transcript_rows.adopt_strays(session, letter.chat_id)
    version = sync_state.versions(session, [letter.chat_id]).get(letter.chat_id)
    if version is None:
        return Replayed(letter, "closed: chat deleted")
    jobs.enqueue(SYNC_CHAT, str(letter.chat_id), version[0])
    return Replayed(letter, f"adopted: {added} elements of the JSONB added to the rows; enqueued")
