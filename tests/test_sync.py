"""Sync tasks: idempotent, order-independent, quiet for a deleted chat; the sweep under a backlog.
Real worker, real Redis."""

from __future__ import annotations

import ast
import itertools
import os
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from app.db import transaction
from app.jobs import SYNC_CHAT, SYNC_MESSAGES
from app.repositories import chats as chats_repo
from app.repositories import sync_state
from app.services import sync
from app.settings import Settings
from app.task_names import SWEEP
from harness.processes import RedisServer
from tasks.publish import producer
from tasks.queues import Queue
from tests.conftest import LOG_DIR, RUN_ID, start_worker
from tests.support import (
    SessionFactory,
    WorkerProcess,
    assert_converged,
    wait_converged,
    wait_until,
)


def element(id_: str, content: str = "x") -> dict[str, object]:
    return {"id": id_, "role": "user", "content": content, "timestamp": "2026-01-01T00:00:00Z"}


def build_history(
    sessionmaker: SessionFactory,
) -> tuple[uuid.UUID, list[tuple[str, tuple[object, ...]]]]:
    """A chat taken through append, edit, removal and append, without publishing anything;
    returns it with the task each mutation would have enqueued."""
    tasks: list[tuple[str, tuple[object, ...]]] = []
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session, user_id="u", title=None, model="m", workflow_id=None, messages=[]
        )
        cid = chat.id
        v = chats_repo.append(session, cid, "u", [element("a"), element("b")])
        assert v is not None
        tasks.append((SYNC_MESSAGES, (str(cid), ["a", "b"], v.version)))
        v = chats_repo.replace_messages(session, cid, "u", [element("a", "edited"), element("c")])
        assert v is not None
        tasks.append((SYNC_CHAT, (str(cid), v.version)))
        v = chats_repo.append(session, cid, "u", [element("d")])
        assert v is not None
        tasks.append((SYNC_MESSAGES, (str(cid), ["d"], v.version)))
    return cid, tasks


def rows(engine: Engine, chat_id: uuid.UUID) -> list[tuple[Any, ...]]:
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


def test_any_order_and_any_repetition_end_in_the_same_rows(
    engine: Engine, sessionmaker: SessionFactory, worker: WorkerProcess
) -> None:
    finals = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 1, 0, 2, 2, 0]):
        chat_id, tasks = build_history(sessionmaker)
        for index in order:
            send(*tasks[index])
        wait_until(lambda: rows(engine, chat_id) and _applied(engine, chat_id) == 3, timeout=30)  # noqa: B023
        assert_converged(engine, [chat_id])
        finals.append([(r[0], r[1], r[2]["content"], r[3]) for r in rows(engine, chat_id)])
    assert finals[0] == finals[1] == finals[2]
    # "b" was removed before any copy ran in some orders: either no row or a soft-deleted one.
    assert [r[:2] for r in finals[0] if not r[3]] == [("a", 0), ("c", 1), ("d", 2)]


def _applied(engine: Engine, chat_id: uuid.UUID) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT applied_version FROM copilot_chat_sync_state WHERE chat_id = :id"),
                {"id": chat_id},
            ).scalar_one()
        )


def test_an_old_task_delivered_late_reads_the_current_jsonb(
    engine: Engine, sessionmaker: SessionFactory, worker: WorkerProcess
) -> None:
    chat_id, tasks = build_history(sessionmaker)
    send(*tasks[0])  # the first append's task, delivered only after everything else happened
    wait_until(lambda: _applied(engine, chat_id) == 3)
    assert_converged(engine, [chat_id])


def test_a_task_for_a_deleted_chat_succeeds_quietly(
    engine: Engine, sessionmaker: SessionFactory, worker: WorkerProcess
) -> None:
    chat_id, tasks = build_history(sessionmaker)
    with transaction(sessionmaker) as session:
        assert chats_repo.delete(session, chat_id, "u")
    task_ids = [send(*task) for task in tasks]
    for task_id in task_ids:
        wait_until(lambda: f"[{task_id}] succeeded" in worker.log(), timeout=30)  # noqa: B023
    assert rows(engine, chat_id) == []
    assert "Traceback" not in worker.log()


def test_service_skips_versions_already_applied(
    sessionmaker: SessionFactory, engine: Engine
) -> None:
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
def test_service_converges_whatever_the_order(
    sessionmaker: SessionFactory,
    engine: Engine,
    order: tuple[int, ...],
) -> None:
    chat_id, tasks = build_history(sessionmaker)
    for index in order:
        version = int(str(tasks[index][1][-1]))
        with transaction(sessionmaker) as session:
            sync.sync_chats(session, {chat_id: version})
    assert_converged(engine, [chat_id])
    assert _applied(engine, chat_id) == 3


def test_a_sync_racing_the_delete_of_its_chat_finds_it_missing(
    sessionmaker: SessionFactory, engine: Engine
) -> None:
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


# ---------------------------------------------------------------------------------------------
# The sweep under a backlog: a broker of the test's own, a worker that runs only the sweep (so
# the syncs it sends pile up), and a sync worker started later.


def behind_chats(sessionmaker: SessionFactory, count: int) -> list[uuid.UUID]:
    """Chats whose copy is behind and whose task was never published."""
    with transaction(sessionmaker) as session:
        return [
            chats_repo.create(
                session,
                user_id="u",
                title=None,
                model="m",
                workflow_id=None,
                messages=[element(f"a{n}"), element(f"b{n}")],
            ).id
            for n in range(count)
        ]


@pytest.fixture()
def sweeper(broker: RedisServer, hooks: Path) -> Iterator[WorkerProcess]:
    """A worker that consumes only the maintenance queue: the syncs it sends wait."""
    env = {
        **os.environ,
        "REDIS_URL": broker.url,
        "DUALWRITE_TEST_HOOKS": str(hooks),
        "SWEEP_GRACE_SECONDS": "0",
    }
    process = WorkerProcess(
        env,
        LOG_DIR / f"sweeper-{RUN_ID}.log",
        f"sweeper-{RUN_ID}",
        "-Q",
        Queue.MAINTENANCE.value,
        "-c",
        "1",
    ).start()
    try:
        yield process
    finally:
        process.stop()


def sweep_once(broker: RedisServer, sweeper: WorkerProcess) -> dict[str, int]:
    """Run one sweep on the sweeper and return what it reported."""
    task_id = producer(Settings(redis_url=broker.url)).send_task(SWEEP).id
    line = wait_until(
        lambda: re.search(
            rf"Task {SWEEP}\[{task_id}\] succeeded in \S+: (\{{.*\}})", sweeper.log()
        ),
        timeout=30,
    )
    report: dict[str, int] = ast.literal_eval(line.group(1))
    return report


def test_the_sweep_under_a_backlog_sends_each_chat_once(
    broker: RedisServer,
    hooks: Path,
    sessionmaker: SessionFactory,
    engine: Engine,
    sweeper: WorkerProcess,
    clean: None,
) -> None:
    chats = behind_chats(sessionmaker, 40)
    reports = [sweep_once(broker, sweeper) for _ in range(3)]
    assert reports[0] == {"behind": 40, "sent": 40, "coalesced": 0, "failed": 0}
    # The syncs still wait: later sweeps see the same chats behind and send nothing.
    assert reports[1:] == [{"behind": 40, "sent": 0, "coalesced": 40, "failed": 0}] * 2
    assert broker.client().llen(Queue.SYNC.value) == 40
    assert "sweep: 40 chats behind, 0 sent, 40 coalesced" in sweeper.log()

    worker = start_worker(broker, hooks, "backlog")
    try:
        wait_converged(engine, chats, timeout=60)
        done = rf"Task {SYNC_CHAT}\[[0-9a-f-]+\] succeeded"
        wait_until(lambda: len(re.findall(done, worker.log())) >= 40, timeout=60)
        received = re.findall(rf"Task {SYNC_CHAT}\[[0-9a-f-]+\] received", worker.log())
        assert len(received) == 40  # one sync per chat, not one per sweep
        assert broker.client().llen(Queue.SYNC.value) == 0
    finally:
        worker.stop()
    # Each task released its chat when it started: nothing is behind, nothing is held.
    assert sweep_once(broker, sweeper) == {"behind": 0, "sent": 0, "coalesced": 0, "failed": 0}
    assert queued_marks(engine) == 0


def queued_marks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM copilot_chat_sync_state WHERE queued_since IS NOT NULL")
            ).scalar_one()
        )


def test_a_chat_whose_task_was_lost_is_sent_again_once_its_mark_is_old(
    broker: RedisServer,
    hooks: Path,
    sessionmaker: SessionFactory,
    engine: Engine,
    sweeper: WorkerProcess,
    clean: None,
) -> None:
    (chat,) = behind_chats(sessionmaker, 1)
    ttl = Settings().coalesce_ttl_seconds

    def mark(age: float) -> None:
        # What a publish leaves behind when its task is then lost (a flushed or evicted
        # queue): the chat marked queued `age` seconds ago, and nothing in the queue.
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE copilot_chat_sync_state "
                    "SET queued_since = now() - make_interval(secs => :age) WHERE chat_id = :id"
                ),
                {"age": age, "id": chat},
            )

    mark(ttl - 30)
    assert sweep_once(broker, sweeper) == {"behind": 1, "sent": 0, "coalesced": 1, "failed": 0}
    assert broker.client().llen(Queue.SYNC.value) == 0

    mark(ttl + 1)
    assert sweep_once(broker, sweeper) == {"behind": 1, "sent": 1, "coalesced": 0, "failed": 0}
    worker = start_worker(broker, hooks, "lost-task")
    try:
        wait_converged(engine, [chat])
    finally:
        worker.stop()


def test_the_sweep_reads_the_backlog_without_resetting_its_age(
    sessionmaker: SessionFactory, clean: None
) -> None:
    chats = behind_chats(sessionmaker, 3)
    with transaction(sessionmaker) as session:
        session.execute(
            text(
                "UPDATE copilot_chat_sync_state SET dirty_since = now() - interval '10 minutes' "
                "WHERE chat_id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": [str(c) for c in chats]},
        )
    sends = []
    for _ in range(2):
        with transaction(sessionmaker) as session:
            due = sync.sweep(session, grace=timedelta(seconds=30), ttl=timedelta(hours=1), limit=2)
        assert len(due) == 2 and {d.chat_id for d in due} <= set(chats)
        sends.append([d.send for d in due])
        with transaction(sessionmaker) as session:
            assert sync_state.oldest_behind_seconds(session) >= 600
    # The first sweep marked what it sends; the second finds those marks (and sends nothing).
    assert sends == [[True, True], [False, False]]


# ---------------------------------------------------------------------------------------------
# One task, many chats: a sync also converges other chats behind, never waiting for one.


@pytest.fixture()
def batch_worker(broker: RedisServer, hooks: Path) -> Iterator[WorkerProcess]:
    worker = start_worker(broker, hooks, "batch", SYNC_BATCH_EXTRA="25")
    try:
        yield worker
    finally:
        worker.stop()


def sync_one(broker: RedisServer, chat: uuid.UUID) -> str:
    return str(
        producer(Settings(redis_url=broker.url)).send_task(SYNC_CHAT, args=[str(chat), 1]).id
    )


def test_one_task_converges_other_chats_behind_in_the_same_statement(
    broker: RedisServer,
    batch_worker: WorkerProcess,
    sessionmaker: SessionFactory,
    engine: Engine,
    clean: None,
) -> None:
    chats = behind_chats(sessionmaker, 12)
    task_id = sync_one(broker, chats[0])
    wait_until(lambda: f"[{task_id}] succeeded" in batch_worker.log(), timeout=30)
    wait_converged(engine, chats, timeout=5)  # no other task was sent
    received = re.findall(rf"Task {SYNC_CHAT}\[[0-9a-f-]+\] received", batch_worker.log())
    assert len(received) == 1


def test_a_chat_another_sync_holds_is_left_to_it_without_waiting(
    broker: RedisServer,
    batch_worker: WorkerProcess,
    sessionmaker: SessionFactory,
    engine: Engine,
    clean: None,
) -> None:
    own, held = behind_chats(sessionmaker, 2)
    with engine.connect() as holder:  # as a running sync of `held` would
        holder.execute(
            text("SELECT pg_advisory_xact_lock(:cls, hashtext(:id))"),
            {"cls": sync_state.SYNC_LOCK_CLASS, "id": str(held)},
        )
        task_id = sync_one(broker, own)
        wait_until(lambda: f"[{task_id}] succeeded" in batch_worker.log(), timeout=30)
        assert_converged(engine, [own])
        with engine.connect() as connection:
            applied = connection.execute(
                text("SELECT applied_version FROM copilot_chat_sync_state WHERE chat_id = :id"),
                {"id": held},
            ).scalar_one()
        assert applied == -1  # not copied, not waited for
        holder.rollback()


def test_a_chat_whose_copy_fails_does_not_fail_the_task_that_picked_it(
    broker: RedisServer,
    batch_worker: WorkerProcess,
    sessionmaker: SessionFactory,
    engine: Engine,
    clean: None,
) -> None:
    own, poison = behind_chats(sessionmaker, 2)
    with engine.begin() as connection:  # every write of this chat's rows fails
        connection.execute(
            text(
                f"""
                CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.chat_id = '{poison}' THEN RAISE EXCEPTION 'poison chat'; END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER test_poison BEFORE INSERT ON copilot_chat_messages
                FOR EACH ROW EXECUTE FUNCTION test_poison();
                """
            )
        )
    try:
        task_id = sync_one(broker, own)
        wait_until(lambda: f"[{task_id}] succeeded" in batch_worker.log(), timeout=30)
        assert f"for {own} with other chats failed, trying it alone" in batch_worker.log()
        assert_converged(engine, [own])
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER test_poison ON copilot_chat_messages"))
            connection.execute(text("DROP FUNCTION test_poison()"))
