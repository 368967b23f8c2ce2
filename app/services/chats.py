"""The chat operations behind each HTTP route: mutate the transcript, then record the copy.

Each function runs inside the caller's unit of work and only records jobs: the boundary commits,
then publishes. The rollout phase, read inside that transaction (a phase change waits for it),
picks the store that is the source of truth: the JSONB (`app.repositories.chats`) up to
`read_table`, the rows (`app.repositories.transcript_rows`) in `table_only`. Both have the same
operations, and the jobs are the same: a sync task keyed on the chat and its version, which the
worker runs in the direction the phase says.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session

from app import jobs, metrics, schemas
from app.errors import Conflict, Invalid, NotFound, TooLarge
from app.repositories import chats as chats_repo
from app.repositories import messages as messages_repo
from app.repositories import phase as phase_repo
from app.repositories import shadow as shadow_repo
from app.repositories import sync_state, transcript_rows
from app.settings import Phase, Settings

log = logging.getLogger(__name__)

# The longest message id the table holds, in UTF-8 bytes (the mapping skips longer ones).
MAX_ID_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Context:
    """What every operation needs besides its arguments."""

    session: Session
    jobs: jobs.JobQueue
    settings: Settings
    user_id: str


@dataclass(frozen=True, slots=True)
class Appended:
    chat_id: uuid.UUID
    message_ids: list[str]
    version: int
    created: bool  # False: the same messages were already there (an idempotent retry)


class Store(Protocol):
    """A transcript store: `app.repositories.chats` (JSONB) or `.transcript_rows` (rows)."""

    def create(
        self,
        session: Session,
        *,
        user_id: str,
        title: str | None,
        model: str,
        workflow_id: str | None,
        messages: list[dict[str, Any]],
    ) -> chats_repo.Chat: ...
    def get(self, session: Session, chat_id: uuid.UUID, user_id: str) -> chats_repo.Chat | None: ...
    def get_messages(self, session: Session, chat_id: uuid.UUID) -> Any: ...
    def find_message(
        self, session: Session, chat_id: uuid.UUID, message_id: str
    ) -> dict[str, Any] | None: ...
    def lock_turn(
        self, session: Session, chat_id: uuid.UUID, user_id: str
    ) -> chats_repo.TurnState | None: ...
    def append(
        self,
        session: Session,
        chat_id: uuid.UUID,
        user_id: str,
        elements: list[dict[str, Any]],
        *,
        queue: bool = False,
        set_active_stream: str | None = None,
        clear_active_stream: bool = False,
        limit: chats_repo.ChatLimit | None = None,
    ) -> sync_state.Written | None: ...
    def size(self, session: Session, chat_id: uuid.UUID) -> tuple[int, int]: ...
    def replace_messages(
        self,
        session: Session,
        chat_id: uuid.UUID,
        user_id: str,
        messages: list[dict[str, Any]],
        *,
        queue: bool = False,
    ) -> sync_state.Written | None: ...
    def fork(
        self, session: Session, chat_id: uuid.UUID, user_id: str, up_to_message_id: str
    ) -> chats_repo.Chat | None: ...
    def delete(self, session: Session, chat_id: uuid.UUID, user_id: str) -> bool: ...
    def page(
        self, session: Session, chat_id: uuid.UUID, *, limit: int, before_seq: int | None
    ) -> list[tuple[int, Any]]: ...


def _store(phase: phase_repo.State) -> Store:
    return transcript_rows if phase.phase is Phase.TABLE_ONLY or phase.contracted else chats_repo


def _writer(ctx: Context) -> Store:
    """The store to write, for a mutation; holds off phase changes until the commit."""
    phase = phase_repo.for_mutation(ctx.session)
    # Nothing to copy before the dual-write starts, nor once the JSONB is gone.
    copying = phase.phase is not Phase.JSONB_ONLY and not phase.contracted
    ctx.jobs.enabled = ctx.jobs.enabled and copying
    if phase.phase is Phase.TABLE_ONLY:
        # The reverse sync rewrites a whole transcript (about 5 MB of WAL at 5,000 messages):
        # held back a moment, it takes in every append of that moment at once (the chat's
        # queued mark holds back their tasks meanwhile).
        ctx.jobs.delay = ctx.settings.reverse_sync_delay_seconds
    return _store(phase)


def _check_size(settings: Settings, element: dict[str, Any], field: tuple[str | int, ...]) -> int:
    """The element's size in bytes; 413 above `max_message_bytes`."""
    size = len(json.dumps(element, ensure_ascii=False).encode())
    if size > settings.max_message_bytes:
        raise TooLarge(
            f"message is {size} bytes, above the limit of {settings.max_message_bytes}",
            field=field,
        )
    return size


def _limit(settings: Settings) -> chats_repo.ChatLimit:
    return chats_repo.ChatLimit(settings.max_chat_messages, settings.max_chat_bytes)


def _chat_full(settings: Settings, count: int, size: int, field: tuple[str | int, ...]) -> None:
    """413 when a chat of `count` messages and `size` bytes would be past the chat limits."""
    if count > settings.max_chat_messages:
        raise TooLarge(
            f"the chat would hold {count} messages, above the limit of "
            f"{settings.max_chat_messages} (MAX_CHAT_MESSAGES)",
            field=field,
        )
    if size > settings.max_chat_bytes:
        raise TooLarge(
            f"the chat would hold {size} bytes, above the limit of {settings.max_chat_bytes} "
            "(MAX_CHAT_BYTES)",
            field=field,
        )


def _same(stored: dict[str, Any] | None, element: dict[str, Any]) -> bool:
    """Whether a stored element is a retry of this one. The timestamp does not count: a client
    that sent none got the server's, which differs on every try."""
    if stored is None:
        return False
    return {k: v for k, v in stored.items() if k != "timestamp"} == {
        k: v for k, v in element.items() if k != "timestamp"
    }


def create_chat(ctx: Context, body: schemas.CreateChat) -> chats_repo.Chat:
    return _writer(ctx).create(
        ctx.session,
        user_id=ctx.user_id,
        title=body.title,
        model=body.model or ctx.settings.default_model,
        workflow_id=body.workflow_id,
        messages=[],
    )


def get_chat(ctx: Context, chat_id: uuid.UUID) -> tuple[chats_repo.Chat, Any]:
    store = _store(phase_repo.current(ctx.session))
    chat = store.get(ctx.session, chat_id, ctx.user_id)
    if chat is None:
        raise NotFound("chat not found", field=("path", "chat_id"))
    return chat, store.get_messages(ctx.session, chat_id)


def get_chat_page(
    ctx: Context, chat_id: uuid.UUID, *, limit: int
) -> tuple[chats_repo.Chat, schemas.MessagePage]:
    """The chat and the last `limit` messages of its transcript (`read_page`), never more: a
    transcript can be far larger than a response should be."""
    page = read_page(ctx, chat_id, limit=limit, before_seq=None)
    chat = _store(phase_repo.current(ctx.session)).get(ctx.session, chat_id, ctx.user_id)
    if chat is None:
        raise NotFound("chat not found", field=("path", "chat_id"))
    return chat, page


def delete_chat(ctx: Context, chat_id: uuid.UUID) -> None:
    """Delete a chat. Its rows go in the same transaction through the foreign key's cascade,
    so there is nothing left for a task to copy."""
    if not _writer(ctx).delete(ctx.session, chat_id, ctx.user_id):
        raise NotFound("chat not found", field=("path", "chat_id"))


def _sync_after(ctx: Context, written: sync_state.Written, task: str, *args: Any) -> None:
    """Send the sync of a write whose statement marked its chat queued; otherwise a sync of the
    chat already waits and will read this write (coalesced, counted)."""
    if written.send:
        ctx.jobs.enqueue(task, *args, queued=args[0])
    elif ctx.jobs.enabled:
        metrics.COALESCED.labels(task).inc()


def _append(
    ctx: Context,
    store: Store,
    chat_id: uuid.UUID,
    elements: list[tuple[tuple[str | int, ...], dict[str, Any]]],
    **stream: Any,
) -> Appended:
    """Append elements atomically, idempotent on their ids, within the chat limits; enqueue
    their copy."""
    added = sum(_check_size(ctx.settings, element, field) for field, element in elements)
    ids = [element["id"] for _, element in elements]
    written = store.append(
        ctx.session,
        chat_id,
        ctx.user_id,
        [e for _, e in elements],
        queue=ctx.jobs.enabled,
        limit=_limit(ctx.settings),
        **stream,
    )
    if written is not None:
        _sync_after(ctx, written, jobs.SYNC_MESSAGES, str(chat_id), ids, written.version)
        return Appended(chat_id, ids, written.version, created=True)
    chat = store.get(ctx.session, chat_id, ctx.user_id)
    if chat is None:
        raise NotFound("chat not found", field=("path", "chat_id"))
    if not all(store.find_message(ctx.session, chat_id, e["id"]) for _, e in elements):
        # Not a retry: the store refused them for the chat's size.
        count, size = store.size(ctx.session, chat_id)
        _chat_full(ctx.settings, count + len(elements), size + added, ("body",))
    for field, element in elements:
        stored = store.find_message(ctx.session, chat_id, element["id"])
        if not _same(stored, element):
            raise Conflict(
                f"message id {element['id']!r} is already in this chat with other content"
                if stored is not None
                else "some of these messages are already in this chat, not all",
                field=(*field, "id"),
            )
    return Appended(chat_id, ids, chat.messages_version, created=False)


def append_user_message(ctx: Context, chat_id: uuid.UUID, body: schemas.AppendMessage) -> Appended:
    """Append a user message and make its id the chat's active stream (the turn it opens)."""
    message = body.message
    element = message.element(streamId=message.id)
    return _append(
        ctx, _writer(ctx), chat_id, [(("body", "message"), element)], set_active_stream=message.id
    )


def complete_turn(
    ctx: Context, chat_id: uuid.UUID, user_message_id: str, body: schemas.CompleteTurn
) -> Appended:
    """Append the assistant reply of a turn, under the chat's row lock.

    Only the active turn, whose user message is still the last element, can be completed; a retry
    of a completion that already landed answers like the first.
    """
    element = body.message.element(streamId=user_message_id)
    store = _writer(ctx)
    turn = store.lock_turn(ctx.session, chat_id, ctx.user_id)
    if turn is None:
        raise NotFound("chat not found", field=("path", "chat_id"))
    stored = store.find_message(ctx.session, chat_id, element["id"])
    if stored is not None:
        if _same(stored, element):
            chat = store.get(ctx.session, chat_id, ctx.user_id)
            assert chat is not None  # locked above
            return Appended(chat_id, [element["id"]], chat.messages_version, created=False)
        raise Conflict(
            f"message id {element['id']!r} is already in this chat with other content",
            field=("body", "message", "id"),
        )
    if turn.active_stream_id != user_message_id:
        raise Conflict(
            f"turn {user_message_id!r} is not the chat's active turn",
            field=("path", "user_message_id"),
        )
    if turn.last_message_id != user_message_id:
        raise Conflict(
            f"message {user_message_id!r} is no longer the last message of the chat",
            field=("path", "user_message_id"),
        )
    return _append(ctx, store, chat_id, [(("body", "message"), element)], clear_active_stream=True)


def append_inbox_pair(ctx: Context, chat_id: uuid.UUID, body: schemas.InboxPair) -> Appended:
    """Append a user message and its reply at once (messages from the inbox)."""
    return _append(
        ctx,
        _writer(ctx),
        chat_id,
        [
            (("body", "user"), body.user.element()),
            (("body", "assistant"), body.assistant.element()),
        ],
    )


def fork_chat(ctx: Context, chat_id: uuid.UUID, body: schemas.Fork) -> chats_repo.Chat:
    """A new chat with the transcript up to and including `up_to_message_id`."""
    store = _writer(ctx)
    forked = store.fork(ctx.session, chat_id, ctx.user_id, body.up_to_message_id)
    if forked is None:
        if store.get(ctx.session, chat_id, ctx.user_id) is None:
            raise NotFound("chat not found", field=("path", "chat_id"))
        raise Invalid(
            f"message {body.up_to_message_id!r} is not in this chat",
            field=("body", "up_to_message_id"),
        )
    # A new chat: no sync of it can be waiting.
    ctx.jobs.enqueue(jobs.SYNC_CHAT, str(forked.id), forked.messages_version)
    return forked


def replace_messages(ctx: Context, chat_id: uuid.UUID, body: schemas.ReplaceMessages) -> int:
    """Replace the whole transcript with a snapshot; returns the chat's version."""
    elements, size = [], 0
    for index, message in enumerate(body.messages):
        element = message.element()
        size += _check_size(ctx.settings, element, ("body", "messages", index))
        elements.append(element)
    _chat_full(ctx.settings, len(elements), size, ("body", "messages"))
    store = _writer(ctx)
    written = store.replace_messages(
        ctx.session, chat_id, ctx.user_id, elements, queue=ctx.jobs.enabled
    )
    if written is not None:
        _sync_after(ctx, written, jobs.SYNC_CHAT, str(chat_id), written.version)
        return written.version
    chat = store.get(ctx.session, chat_id, ctx.user_id)
    if chat is None:
        raise NotFound("chat not found", field=("path", "chat_id"))
    return chat.messages_version  # the snapshot equals what is stored


def import_chat(ctx: Context, body: schemas.ImportChat) -> chats_repo.Chat:
    """Create a chat for any user with a whole transcript (admin only; checked by the route)."""
    elements, size = [], 0
    for index, message in enumerate(body.messages):
        element = message.element()
        size += _check_size(ctx.settings, element, ("body", "messages", index))
        elements.append(element)
    _chat_full(ctx.settings, len(elements), size, ("body", "messages"))
    chat = _writer(ctx).create(
        ctx.session,
        user_id=body.user_id,
        title=body.title,
        model=body.model or ctx.settings.default_model,
        workflow_id=body.workflow_id,
        messages=elements,
    )
    if chat.messages_version > 0:
        ctx.jobs.enqueue(jobs.SYNC_CHAT, str(chat.id), chat.messages_version)
    return chat


def read_page(
    ctx: Context, chat_id: uuid.UUID, *, limit: int, before_seq: int | None
) -> schemas.MessagePage:
    """A page of the transcript, newest last, served from where the rollout phase says.

    In `verify_reads` the JSONB is served and the table is read too and compared (counted in
    `dualwrite_shadow_reads_total`; a mismatch is also recorded, as evidence for the phase
    gates). In `read_table` a chat whose copy is behind its JSONB is served from the JSONB. In
    `table_only` the rows are the transcript.
    """
    if limit < 1 or limit > ctx.settings.max_page_size:
        raise Invalid(
            f"limit must be between 1 and {ctx.settings.max_page_size}", field=("query", "limit")
        )
    phase = phase_repo.current(ctx.session)
    store = _store(phase)
    chat = store.get(ctx.session, chat_id, ctx.user_id)
    if chat is None:
        raise NotFound("chat not found", field=("path", "chat_id"))
    source: Literal["jsonb", "table"] = "table"
    if store is transcript_rows:
        rows = store.page(ctx.session, chat_id, limit=limit, before_seq=before_seq)
    else:
        applied = sync_state.versions(ctx.session, [chat_id]).get(chat_id, (0, -1))[1]
        in_sync = applied >= chat.messages_version
        if phase.phase is Phase.READ_TABLE and in_sync:
            rows = messages_repo.page(ctx.session, chat_id, limit=limit, before_seq=before_seq)
        else:
            rows = chats_repo.page(ctx.session, chat_id, limit=limit, before_seq=before_seq)
            source = "jsonb"
            if phase.phase is Phase.VERIFY_READS:
                _shadow_read(ctx, chat_id, rows, in_sync=in_sync)
    seqs = [seq for seq, _ in rows]
    return schemas.MessagePage(
        messages=[element for _, element in rows],
        seqs=seqs,
        next_before_seq=seqs[0] if len(rows) == limit and seqs[0] > 0 else None,
        source=source,
    )


def _copied_id(element: Any) -> str | None:
    """The id under which the table holds this element, None if it cannot be copied: the
    mapping's rule (not an object, or no id that is a non-empty string of at most 1024 bytes)."""
    if not isinstance(element, dict):
        return None
    message_id = element.get("id")
    if not isinstance(message_id, str) or not message_id:
        return None
    return message_id if len(message_id.encode()) <= MAX_ID_BYTES else None


def _shadow_read(
    ctx: Context, chat_id: uuid.UUID, served: list[tuple[int, Any]], *, in_sync: bool
) -> None:
    """Compare a page served from the JSONB with the table's rows for the same positions.

    The table's mapping applies: an element that cannot be copied has no row, and of elements
    sharing an id only the first has one. The first may lie before the page: an element whose
    id the table holds at an earlier position is such a repeat (that position's own page checks
    the row).
    """
    if not in_sync:
        metrics.SHADOW_READS.labels("behind").inc()
        return
    if not served:
        metrics.SHADOW_READS.labels("match").inc()
        return
    first, last = served[0][0], served[-1][0]
    table = messages_repo.page(ctx.session, chat_id, limit=len(served), before_seq=last + 1)
    got = [(seq, element) for seq, element in table if seq >= first]
    expected: list[tuple[int, Any]] = []
    seen: set[str] = set()
    for seq, element in served:
        message_id = _copied_id(element)
        if message_id is not None and message_id not in seen:
            seen.add(message_id)
            expected.append((seq, element))
    if got != expected:
        has_row = {seq for seq, _ in got}
        rowless = {element["id"]: seq for seq, element in expected if seq not in has_row}
        earlier = shadow_repo.live_seqs(ctx.session, chat_id, list(rowless))
        expected = [
            (seq, element)
            for seq, element in expected
            if not (element["id"] in rowless and earlier.get(element["id"], seq) < first)
        ]
    outcome = "match" if got == expected else "mismatch"
    metrics.SHADOW_READS.labels(outcome).inc()
    if outcome == "mismatch":
        log.warning("shadow read of chat %s differs between JSONB and table", chat_id)
        phase_repo.record_mismatch(
            ctx.session, chat_id, f"positions {first}-{last}: JSONB and table differ"
        )
