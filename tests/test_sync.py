"""Sync tasks: idempotent, order-independent, quiet for a deleted chat. Real worker, real Redis."""

from __future__ import annotations

import itertools
import uuid

import pytest
from sqlalchemy import text

from app.db import transaction
from app.jobs import SYNC_CHAT, SYNC_MESSAGES
from app.repositories import chats as chats_repo
from app.services import sync
from tests.support import assert_converged, wait_until


def element(id_: str, content: str = "x") -> dict[str, object]:
    return {"id": id_, "role": "user", "content": content, "timestamp": "2026-01-01T00:00:00Z"}


def build_history(sessionmaker) -> tuple[uuid.UUID, list[tuple[str, tuple[object, ...]]]]:  # type: ignore[no-untyped-def]
    """A chat taken through append, edit, removal and append, without publishing anything;
    returns it with the task each mutation would have enqueued."""
    tasks: list[tuple[str, tuple[object, ...]]] = []
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session, user_id="u", title=None, model="m", workflow_id=None, messages=[]
        )
        cid = chat.id
        v = chats_repo.append(session, cid, "u", [element("a"), element("b")])
        tasks.append((SYNC_MESSAGES, (str(cid), ["a", "b"], v)))
        v = chats_repo.replace_messages(session, cid, "u", [element("a", "edited"), element("c")])
        tasks.append((SYNC_CHAT, (str(cid), v)))
        v = chats_repo.append(session, cid, "u", [element("d")])
        tasks.append((SYNC_MESSAGES, (str(cid), ["d"], v)))
    return cid, tasks


def rows(engine, chat_id: uuid.UUID) -> list[tuple[object, ...]]:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return [
            tuple(r)
            for r in connection.execute(
                text(
                    "SELECT message_id, seq, content, deleted_at IS NOT NULL, source_version "
                    "FROM copilot_chat_messages WHERE chat_id = :id ORDER BY message_id"
                ),
                {"id": chat_id},
            )
        ]


def send(task: str, args: tuple[object, ...]) -> str:
    from tasks import celery

    return str(celery.send_task(task, args=args).id)


def test_any_order_and_any_repetition_end_in_the_same_rows(engine, sessionmaker, worker) -> None:  # type: ignore[no-untyped-def]
    finals = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 1, 0, 2, 2, 0]):
        chat_id, tasks = build_history(sessionmaker)
        for index in order:
            send(*tasks[index])
        wait_until(lambda c=chat_id: rows(engine, c) and _applied(engine, c) == 3, timeout=30)
        assert_converged(engine, [chat_id])
        finals.append([(r[0], r[1], r[2]["content"], r[3]) for r in rows(engine, chat_id)])
    assert finals[0] == finals[1] == finals[2]
    # "b" was removed before any copy ran in some orders: either no row or a soft-deleted one.
    assert [r[:2] for r in finals[0] if not r[3]] == [("a", 0), ("c", 1), ("d", 2)]


def _applied(engine, chat_id: uuid.UUID) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT applied_version FROM copilot_chat_sync_state WHERE chat_id = :id"),
                {"id": chat_id},
            ).scalar_one()
        )


def test_an_old_task_delivered_late_reads_the_current_jsonb(engine, sessionmaker, worker) -> None:  # type: ignore[no-untyped-def]
    chat_id, tasks = build_history(sessionmaker)
    send(*tasks[0])  # the first append's task, delivered only after everything else happened
    wait_until(lambda: _applied(engine, chat_id) == 3)
    assert_converged(engine, [chat_id])


def test_a_task_for_a_deleted_chat_succeeds_quietly(engine, sessionmaker, worker) -> None:  # type: ignore[no-untyped-def]
    chat_id, tasks = build_history(sessionmaker)
    with transaction(sessionmaker) as session:
        assert chats_repo.delete(session, chat_id, "u")
    task_ids = [send(*task) for task in tasks]
    for task_id in task_ids:
        wait_until(lambda tid=task_id: f"[{tid}] succeeded" in worker.log(), timeout=30)
    assert rows(engine, chat_id) == []
    assert "Traceback" not in worker.log()


def test_service_skips_versions_already_applied(sessionmaker, engine) -> None:  # type: ignore[no-untyped-def]
    chat_id, _ = build_history(sessionmaker)
    with transaction(sessionmaker) as session:
        first = sync.sync_chats(session, {chat_id: 3})
    with transaction(sessionmaker) as session:
        again = sync.sync_chats(session, {chat_id: 3})
        older = sync.sync_chats(session, {chat_id: 1})
    assert (first.inserted, first.skipped) == (3, 0)
    assert (again.skipped, older.skipped, again.inserted + again.updated) == (1, 1, 0)
    assert_converged(engine, [chat_id])


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_service_converges_whatever_the_order(sessionmaker, engine, order) -> None:  # type: ignore[no-untyped-def]
    chat_id, tasks = build_history(sessionmaker)
    for index in order:
        version = int(tasks[index][1][-1])  # type: ignore[call-overload]
        with transaction(sessionmaker) as session:
            sync.sync_chats(session, {chat_id: version})
    assert_converged(engine, [chat_id])
    assert _applied(engine, chat_id) == 3


def test_a_sync_racing_the_delete_of_its_chat_finds_it_missing(sessionmaker, engine) -> None:  # type: ignore[no-untyped-def]
    import os
    import threading

    import psycopg

    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session,
            user_id="u",
            title=None,
            model="m",
            workflow_id=None,
            messages=[element("a")],
        )
    deleting = psycopg.connect(os.environ["DATABASE_URL"])
    deleting.execute("DELETE FROM copilot_chats WHERE id = %s", (chat.id,))
    threading.Timer(0.5, deleting.commit).start()  # commits while the sync waits on the row
    try:
        with transaction(sessionmaker) as session:
            report = sync.sync_chats(session, {chat.id: 1})
    finally:
        deleting.close()
    assert (report.missing, report.inserted) == (1, 0)
    assert rows(engine, chat.id) == []
