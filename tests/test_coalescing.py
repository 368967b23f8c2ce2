"""Coalescing in the database: a write sends a sync of its chat only when none waits (decided in
the write's own statement, through `copilot_chat_sync_state.queued_since`), and a sync clears
the mark only once the writes in flight have committed. Real PostgreSQL, both stores."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, text

from app import metrics, schemas
from app.db import transaction
from app.jobs import SYNC_MESSAGES, JobQueue
from app.repositories import sync_state
from app.services import chats as service
from app.settings import Settings
from tests.support import SessionFactory, SetPhase, wait_until

SETTINGS = Settings()
USER = "coalescing-user"


def write(sessionmaker: SessionFactory, operation: Callable[..., Any], *args: Any) -> JobQueue:
    """Run one chat operation in its own committed transaction; the jobs it recorded."""
    jobs = JobQueue()
    with transaction(sessionmaker) as session:
        operation(service.Context(session, jobs, SETTINGS, USER), *args)
    return jobs


def new_chat(sessionmaker: SessionFactory) -> uuid.UUID:
    created: list[uuid.UUID] = []
    write(
        sessionmaker, lambda ctx: created.append(service.create_chat(ctx, schemas.CreateChat()).id)
    )
    return created[0]


def append_body() -> schemas.AppendMessage:
    message = {"id": f"m-{uuid.uuid4().hex[:8]}", "role": "user", "content": "hi"}
    return schemas.AppendMessage.model_validate({"message": message}, strict=False)


def queued(sessionmaker: SessionFactory, chat: uuid.UUID) -> bool:
    with transaction(sessionmaker) as session:
        return bool(
            session.execute(
                text(
                    "SELECT queued_since IS NOT NULL FROM copilot_chat_sync_state "
                    "WHERE chat_id = :id"
                ),
                {"id": chat},
            ).scalar_one()
        )


def waiting_on_a_lock(engine: Engine, query: str) -> bool:
    """Whether a statement `LIKE query` waits for a lock."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND query LIKE :query"
                ),
                {"query": query},
            ).scalar_one()
        )


def clear(sessionmaker: SessionFactory, chat: uuid.UUID) -> None:
    with transaction(sessionmaker) as session:
        sync_state.clear_queued(session, [chat])


def clear_as_a_sync_does(chat: uuid.UUID) -> None:
    """The worker's clear (`tasks.sync._unqueue`): its own transaction on the sync's connection,
    committed without waiting for the WAL flush."""
    from tasks.runtime import worker_connection
    from tasks.sync import _unqueue

    with worker_connection() as connection:
        _unqueue(connection, chat)


@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
def test_a_write_sends_a_sync_only_while_none_waits(
    sessionmaker: SessionFactory,
    set_phase: SetPhase,
    phase: str,
) -> None:
    set_phase(phase)
    chat = new_chat(sessionmaker)
    coalesced = metrics.COALESCED.labels(SYNC_MESSAGES)
    before = coalesced._value.get()

    first = write(sessionmaker, service.append_user_message, chat, append_body())
    assert [(job.task, job.queued) for job in first.jobs] == [(SYNC_MESSAGES, str(chat))]
    assert queued(sessionmaker, chat)
    # Its sync has not started: the next writes are read by it, and send nothing.
    for _ in range(2):
        assert write(sessionmaker, service.append_user_message, chat, append_body()).jobs == []
    replace = schemas.ReplaceMessages.model_validate({"messages": []}, strict=False)
    assert write(sessionmaker, service.replace_messages, chat, replace).jobs == []
    assert coalesced._value.get() - before == 2

    # The sync starts (clears the mark): the next write sends one again.
    clear(sessionmaker, chat)
    assert not queued(sessionmaker, chat)
    again = write(sessionmaker, service.append_user_message, chat, append_body())
    assert len(again.jobs) == 1 and queued(sessionmaker, chat)


def test_nothing_is_marked_while_nothing_is_copied(
    sessionmaker: SessionFactory, set_phase: SetPhase
) -> None:
    chat = new_chat(sessionmaker)
    set_phase("jsonb_only")
    assert write(sessionmaker, service.append_user_message, chat, append_body()).jobs == []
    assert not queued(sessionmaker, chat)
    set_phase("dual_write")
    assert len(write(sessionmaker, service.append_user_message, chat, append_body()).jobs) == 1


@pytest.mark.parametrize("by", ["clear_queued", "a sync"])
@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
def test_a_sync_clears_the_mark_only_after_the_writes_in_flight_commit(
    sessionmaker: SessionFactory,
    engine: Engine,
    set_phase: SetPhase,
    phase: str,
    by: str,
) -> None:
    """The race coalescing must not lose: a write finds the mark set and sends nothing, so the
    waiting sync must read it. The sync's clear waits for that write's commit; its read comes
    after the clear, so it sees the write."""
    set_phase(phase)
    chat = new_chat(sessionmaker)
    write(sessionmaker, service.append_user_message, chat, append_body())  # marks the chat
    body = append_body()
    jobs = JobQueue()
    with transaction(sessionmaker) as session:
        service.append_user_message(service.Context(session, jobs, SETTINGS, USER), chat, body)
        assert jobs.jobs == []  # coalesced: it relies on the waiting sync

        cleared = threading.Event()

        def clear_then_signal() -> None:
            if by == "clear_queued":
                clear(sessionmaker, chat)
            else:
                clear_as_a_sync_does(chat)
            cleared.set()

        clearing = threading.Thread(target=clear_then_signal)
        clearing.start()

        wait_until(
            lambda: waiting_on_a_lock(engine, "%queued_since = NULL%"),
            timeout=10,
            what="the clear to wait for the write",
        )
        assert not cleared.is_set()
    # The write committed: the clear goes through, and what reads after it sees the write.
    clearing.join(timeout=10)
    assert cleared.is_set() and not queued(sessionmaker, chat)
    with transaction(sessionmaker) as session:
        ctx = service.Context(session, JobQueue(), SETTINGS, USER)
        _, messages = service.get_chat(ctx, chat)
    assert body.message.id in [m["id"] for m in messages]


def test_a_write_that_began_before_a_clear_judges_the_cleared_mark(
    sessionmaker: SessionFactory, engine: Engine
) -> None:
    """A write's statement takes its snapshot, then waits for the chat's row; meanwhile a sync
    starts and clears the mark. The write must see the clear (and send), not the mark of its
    snapshot: that sync may have read the chat before this write committed."""
    chat = new_chat(sessionmaker)
    write(sessionmaker, service.append_user_message, chat, append_body())  # marks the chat
    sent: list[JobQueue] = []
    with engine.connect() as holder:
        holder.execute(
            text("SELECT 1 FROM copilot_chats WHERE id = :id FOR NO KEY UPDATE"), {"id": chat}
        )
        writer = threading.Thread(
            target=lambda: sent.append(
                write(sessionmaker, service.append_user_message, chat, append_body())
            )
        )
        writer.start()

        wait_until(
            lambda: waiting_on_a_lock(engine, "%UPDATE copilot_chats SET%"),
            timeout=10,
            what="the write to wait for the chat's row",
        )
        clear(sessionmaker, chat)  # the sync starts while the write waits
        holder.rollback()
    writer.join(timeout=10)
    assert len(sent) == 1 and len(sent[0].jobs) == 1
    assert queued(sessionmaker, chat)


@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
def test_a_write_never_waits_for_a_sync_in_progress(
    sessionmaker: SessionFactory, set_phase: SetPhase, phase: str
) -> None:
    """Why a sync commits its clear before its claim rather than with its copy: a write of the
    chat goes through (and sends a sync of its own) while the sync's transaction, which has
    cleared the mark, claimed the chat and read it, is still open."""
    from tasks.runtime import session_on, worker_connection
    from tasks.sync import _unqueue

    set_phase(phase)
    chat = new_chat(sessionmaker)
    write(sessionmaker, service.append_user_message, chat, append_body())  # marks the chat
    sent: list[JobQueue] = []
    with worker_connection() as connection:
        _unqueue(connection, chat)
        with session_on(connection) as session:
            claim = sync_state.claim(session, [chat], extra=0)
            assert [c.chat_id for c in claim.chats] == [chat]

            def writes() -> None:
                sent.append(write(sessionmaker, service.append_user_message, chat, append_body()))

            writer = threading.Thread(target=writes)
            writer.start()
            writer.join(timeout=10)
            assert not writer.is_alive(), "the write waited for the sync's transaction"
    assert len(sent) == 1 and len(sent[0].jobs) == 1
    assert queued(sessionmaker, chat)
