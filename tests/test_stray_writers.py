"""Writers that know nothing of the migration (a script, the previous release) against the steps
into and out of `table_only`: their writes are either refused or end in both stores, a step
finishes or refuses within its bound whatever they do, and a refusal is one line that changes
nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from app.db import transaction
from app.jobs import JobQueue
from app.repositories import chats as chats_repo
from app.repositories import messages as messages_repo
from app.repositories import sync_state
from app.services import replay, sync
from harness.processes import RedisServer
from tests.support import ROOT, AuthHeaders, SessionFactory, SetPhase, wait_until
from tests.test_handlers import message, new_chat
from tests.test_transitions import Client, api_process, quiet_and_equal

__all__ = ["api_process"]  # a fixture of test_transitions, used here too

APPEND_STRAY = "UPDATE copilot_chats SET messages = messages || CAST(:e AS jsonb) WHERE id = :id"
STRAY = json.dumps([{"id": "stray", "role": "user", "content": "from a script"}])


def phase_set(name: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "phase", "set", name],
        cwd=ROOT,
        env={**os.environ, "PHASE_GATE_MIN_SECONDS": "0", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def current_phase(engine: Engine) -> tuple[str, str | None]:
    with engine.connect() as connection:
        row = connection.execute(text("SELECT phase, pending FROM dualwrite_phase")).one()
    return row[0], row[1]


def jsonb_ids(engine: Engine, chat: str) -> list[str]:
    with engine.connect() as connection:
        messages = connection.execute(
            text("SELECT messages FROM copilot_chats WHERE id = :id"), {"id": chat}
        ).scalar_one()
    return [m["id"] for m in messages]


def row_ids(engine: Engine, chat: str) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT message_id FROM copilot_chat_messages WHERE chat_id = :id "
                    "AND deleted_at IS NULL ORDER BY seq"
                ),
                {"id": chat},
            ).scalars()
        )


def sync_now(sessionmaker: SessionFactory, chat: str) -> sync.SyncReport:
    with transaction(sessionmaker) as session:
        return sync.sync_chats(session, {uuid.UUID(chat): 0})


def test_a_script_writing_during_a_step_into_table_only_waits_then_is_refused(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    set_phase: SetPhase,
) -> None:
    """The step holds the phase for its change: a plain-SQL write of the JSONB waits for it,
    sees `table_only` once it commits, and is refused, instead of being acknowledged behind
    the step's back and erased by the next reverse sync."""
    set_phase("read_table")
    chat = new_chat(api, auth)
    before = jsonb_ids(engine, chat)
    outcome: list[str] = []

    def script() -> None:
        try:
            with engine.begin() as connection:
                connection.execute(
                    text(APPEND_STRAY),
                    {"e": STRAY, "id": chat},
                )
            outcome.append("committed")
        except DBAPIError as error:
            outcome.append(str(error.orig))

    with engine.connect() as step:
        step.execute(text("LOCK TABLE dualwrite_phase IN EXCLUSIVE MODE"))
        step.execute(text("SELECT phase FROM dualwrite_phase FOR UPDATE"))
        writer = threading.Thread(target=script)
        writer.start()
        time.sleep(1.5)
        waited = list(outcome)
        step.execute(text("UPDATE dualwrite_phase SET phase = 'table_only', since = now()"))
        step.commit()
    writer.join(30)
    assert waited == [], "the script's write went through while the phase was changing"
    assert len(outcome) == 1 and "read-only in phase table_only" in outcome[0], outcome
    assert jsonb_ids(engine, chat) == before


def test_a_step_waits_for_a_script_in_flight_and_copies_its_write(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    set_phase: SetPhase,
    clean: None,
) -> None:
    """A script's transaction that wrote the JSONB before the step holds the phase: the step
    waits for it to commit, then converges its write, so the rows (and after them the JSONB)
    keep it through every later write in `table_only`."""
    set_phase("read_table")
    chat = new_chat(api, auth)
    first = message()
    assert api.post(f"/chats/{chat}/messages", json={"message": first}, headers=auth()).is_success
    sync_now(sessionmaker, chat)
    with engine.connect() as script:
        script.execute(
            text(
                "UPDATE copilot_chats SET messages = messages || CAST(:e AS jsonb) WHERE id = :id"
            ),
            {"e": STRAY, "id": chat},
        )
        done: list[subprocess.CompletedProcess[str]] = []
        step = threading.Thread(target=lambda: done.append(phase_set("table_only")))
        step.start()
        time.sleep(2.0)
        assert done == [], "the step did not wait for the script's open transaction"
        script.commit()
    step.join(120)
    assert done and done[0].returncode == 0, done[0].stderr if done else "no step"
    assert row_ids(engine, chat) == [first["id"], "stray"]
    later = message()
    assert api.post(f"/chats/{chat}/messages", json={"message": later}, headers=auth()).is_success
    sync_now(sessionmaker, chat)  # the reverse sync
    assert jsonb_ids(engine, chat) == [first["id"], "stray", later["id"]]
    assert row_ids(engine, chat) == jsonb_ids(engine, chat)


def test_the_reverse_sync_leaves_a_jsonb_that_moved_on_by_itself_and_replay_adopts_it(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    set_phase: SetPhase,
) -> None:
    """A write that bypassed the triggers in `table_only` (they refuse every other): the reverse
    sync does not erase it but parks the chat in a `diverged` dead letter; a replay adds what
    the rows lack to the rows, and the JSONB then follows the rows with both writes."""
    chat = new_chat(api, auth)
    set_phase("table_only")
    ours = message()
    assert api.post(f"/chats/{chat}/messages", json={"message": ours}, headers=auth()).is_success
    with engine.begin() as connection:
        connection.execute(text("SET LOCAL session_replication_role = replica"))  # no triggers
        connection.execute(
            text(
                "UPDATE copilot_chats SET messages = messages || CAST(:e AS jsonb), "
                "messages_version = messages_version + 1 WHERE id = :id"
            ),
            {"e": STRAY, "id": chat},
        )
    report = sync_now(sessionmaker, chat)
    assert report.diverged == 1
    assert jsonb_ids(engine, chat) == ["stray"]  # left as it is
    with engine.connect() as connection:
        letters = connection.execute(
            text(
                "SELECT id, reason FROM dualwrite_dead_letters "
                "WHERE chat_id = :id AND resolved_at IS NULL"
            ),
            {"id": chat},
        ).all()
    assert [r.reason for r in letters] == ["diverged"]
    sync_now(sessionmaker, chat)  # again: still left alone, still one letter
    assert jsonb_ids(engine, chat) == ["stray"]

    later = message()  # the service goes on writing the rows meanwhile
    assert api.post(f"/chats/{chat}/messages", json={"message": later}, headers=auth()).is_success
    sync_now(sessionmaker, chat)
    assert jsonb_ids(engine, chat) == ["stray"]

    jobs = JobQueue()
    with transaction(sessionmaker) as session:
        (done,) = replay.replay(session, jobs, [letters[0].id])
    assert done.action.startswith("adopted: 1 elements")
    assert [job.args[0] for job in jobs.jobs] == [chat]
    sync_now(sessionmaker, chat)
    assert row_ids(engine, chat) == [ours["id"], later["id"], "stray"]
    assert jsonb_ids(engine, chat) == row_ids(engine, chat)


def test_a_step_refuses_within_its_timeout_in_one_line_and_changes_nothing(
    engine: Engine,
    set_phase: SetPhase,
) -> None:
    """A long transaction holding the phase (a script's write left open) keeps the step from
    ever taking it: the step refuses within PHASE_STEP_TIMEOUT_SECONDS, says why in one line,
    and leaves the phase and its pending mark as they were."""
    set_phase("read_table")
    with engine.connect() as script:
        script.execute(text("SELECT phase FROM dualwrite_phase FOR SHARE"))
        started = time.monotonic()
        refused = phase_set("table_only", PHASE_STEP_TIMEOUT_SECONDS="6", PHASE_LOCK_WAIT_MS="500")
        took = time.monotonic() - started
        script.rollback()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if line.startswith("refused:")] == [
        refused.stderr.strip().splitlines()[-1]
    ]
    assert "could not lock the phase" in refused.stderr
    assert took < 6 + 20  # the timeout, plus the interpreter's start
    assert current_phase(engine) == ("read_table", None)


@dataclass
class Script:
    """A writer that knows nothing of the migration: appends to the JSONB of chats of its own
    with plain SQL, as fast as `pause` lets it; a write is acknowledged when it commits."""

    dsn: str
    chats: list[str]
    pause: float
    acked: dict[str, list[str]] = field(default_factory=dict)
    refused: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            n = 0
            while not stop.is_set():
                chat = self.chats[n % len(self.chats)]
                element = {"id": f"s-{uuid.uuid4().hex[:12]}", "role": "user", "content": "x"}
                n += 1
                try:
                    connection.execute(
                        "UPDATE copilot_chats SET messages = messages || %s::jsonb WHERE id = %s",
                        (json.dumps([element]), chat),
                    )
                except psycopg.errors.ReadOnlySqlTransaction:
                    self.refused += 1
                except psycopg.Error as error:
                    self.errors.append(str(error))
                else:
                    self.acked.setdefault(chat, []).append(element["id"])
                if self.pause:
                    time.sleep(self.pause)


def script_chats(engine: Engine, count: int) -> list[str]:
    with engine.begin() as connection:
        return [
            str(c)
            for c in connection.execute(
                text(
                    "INSERT INTO copilot_chats (user_id, model) "
                    "SELECT 'script', 'm' FROM generate_series(1, :n) RETURNING id"
                ),
                {"n": count},
            ).scalars()
        ]


def test_script_writers_and_api_clients_through_repeated_steps_lose_nothing(
    api_process: str,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    broker: RedisServer,
    set_phase: SetPhase,
    clean: None,
) -> None:
    """Two plain-SQL connections append ~100 times a second, two API clients chat, and the
    phase steps `read_table` <-> `table_only` eight times: every step goes through, and every
    acknowledged write ends in both the rows and the JSONB."""
    set_phase("read_table")
    dsn = os.environ["DATABASE_URL"]
    scripts = [Script(dsn, script_chats(engine, 3), pause=0.01) for _ in range(2)]
    clients = [Client(api_process, auth(f"client-{i}"), seed=i) for i in range(2)]
    stop, go = threading.Event(), threading.Event()
    go.set()
    threads = [threading.Thread(target=s.run, args=(stop,)) for s in scripts]
    threads += [threading.Thread(target=c.run, args=(go, stop)) for c in clients]
    for thread in threads:
        thread.start()
    try:
        for target in ["table_only", "read_table"] * 4:
            time.sleep(1.0)
            moved = phase_set(target, PHASE_STEP_TIMEOUT_SECONDS="120")
            assert moved.returncode == 0, moved.stdout + moved.stderr
        time.sleep(1.0)
        go.clear()
        wait_until(lambda: all(c.paused.is_set() for c in clients), timeout=60)
    finally:
        stop.set()
        go.set()
        for thread in threads:
            thread.join(60)
    assert [f for c in clients for f in c.failures] == []
    assert [e for s in scripts for e in s.errors] == []
    assert sum(s.refused for s in scripts) > 0  # table_only did refuse them
    acked = sum(len(ids) for s in scripts for ids in s.acked.values())
    assert acked > 100
    quiet_and_equal(engine, broker, clients)
    with transaction(sessionmaker) as session:  # the scripts' last writes, as the sweep would
        sync.sync_chats(session, sync_state.behind_ids(session, limit=100_000))
    for script in scripts:
        for chat in script.chats:
            assert jsonb_ids(engine, chat) == script.acked.get(chat, []), chat
            assert row_ids(engine, chat) == jsonb_ids(engine, chat), chat


def test_a_step_under_a_fast_script_writer_finishes_within_its_bound(
    engine: Engine,
    sessionmaker: SessionFactory,
    set_phase: SetPhase,
    clean: None,
) -> None:
    """A script appending as fast as it can, to many chats (none of its writes sends a sync):
    the step into `table_only` works through finite sets, prints its progress, then holds the
    script for the last few; the step back does the same the other way."""
    set_phase("read_table")
    dsn = os.environ["DATABASE_URL"]
    scripts = [Script(dsn, script_chats(engine, 400), pause=0) for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,)) for s in scripts]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3.0)  # a backlog of chats behind builds up
        started = time.monotonic()
        into = phase_set("table_only", PHASE_STEP_TIMEOUT_SECONDS="90")
        took = time.monotonic() - started
        assert into.returncode == 0, into.stdout + into.stderr
        assert took < 90 + 20
        assert "catching up" in into.stderr
        time.sleep(1.0)
        back = phase_set("read_table", PHASE_STEP_TIMEOUT_SECONDS="90")
        assert back.returncode == 0, back.stdout + back.stderr
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert [e for s in scripts for e in s.errors] == []
    assert sum(s.refused for s in scripts) > 0
    with transaction(sessionmaker) as session:  # what the sweep would send
        sync.sync_chats(session, sync_state.behind_ids(session, limit=100_000))
    for script in scripts:
        for chat, ids in script.acked.items():
            assert jsonb_ids(engine, chat) == ids, chat
            assert row_ids(engine, chat) == ids, chat


def test_a_page_cursor_names_the_same_message_in_both_stores_after_a_step_back(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    set_phase: SetPhase,
) -> None:
    """Elements the table cannot hold leave gaps in the rows' `seq`; in `table_only` the
    reverse sync writes the JSONB without them, and renumbers the rows with it, so that after
    a step back a `before_seq` from a page of the table means the same in the JSONB."""
    chat = new_chat(api, auth)
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE copilot_chats SET messages = CAST(:m AS jsonb) WHERE id = :id"),
            {
                "m": json.dumps(
                    [message(id="a"), {"no": "id"}, message(id="b"), "text", message(id="c")]
                ),
                "id": chat,
            },
        )
    sync_now(sessionmaker, chat)
    set_phase("table_only")
    assert api.post(
        f"/chats/{chat}/messages", json={"message": message(id="d")}, headers=auth()
    ).is_success
    sync_now(sessionmaker, chat)  # the reverse sync
    set_phase("read_table")
    assert jsonb_ids(engine, chat) == ["a", "b", "c", "d"]
    chat_id = uuid.UUID(chat)
    with transaction(sessionmaker) as session:
        for before in [None, 4, 3, 2, 1]:
            for limit in (1, 2, 3):
                table = messages_repo.page(session, chat_id, limit=limit, before_seq=before)
                jsonb = chats_repo.page(session, chat_id, limit=limit, before_seq=before)
                assert [(s, e["id"]) for s, e in table] == [(s, e["id"]) for s, e in jsonb], (
                    before,
                    limit,
                )
    # The head follows the renumbering: the next append in table_only takes the next position.
    set_phase("table_only")
    assert api.post(
        f"/chats/{chat}/messages", json={"message": message(id="e")}, headers=auth()
    ).is_success
    with engine.connect() as connection:
        seqs = connection.execute(
            text(
                "SELECT seq FROM copilot_chat_messages WHERE chat_id = :id "
                "AND deleted_at IS NULL ORDER BY seq"
            ),
            {"id": chat},
        ).scalars()
        assert list(seqs) == [0, 1, 2, 3, 4]


def test_renumbering_waits_for_a_writer_of_the_rows_and_keeps_its_order(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    set_phase: SetPhase,
) -> None:
    """The reverse sync renumbers a chat's rows under the chat's head lock, as every writer of
    the rows takes it: a snapshot replace in flight is waited for, and its order stands."""
    chat = new_chat(api, auth)
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE copilot_chats SET messages = CAST(:m AS jsonb) WHERE id = :id"),
            {
                "m": json.dumps([message(id="a"), "gap", message(id="b"), message(id="c")]),
                "id": chat,
            },
        )
    sync_now(sessionmaker, chat)
    set_phase("table_only")
    with engine.begin() as connection:  # the chat is behind: its JSONB must follow
        connection.execute(
            text(
                "UPDATE copilot_chat_sync_state SET wanted_version = wanted_version + 1 "
                "WHERE chat_id = :id"
            ),
            {"id": chat},
        )
    done: list[sync.SyncReport] = []
    with engine.connect() as writer:  # a replace to [c, a, b], holding the head as writers do
        writer.execute(
            text("SELECT 1 FROM copilot_chat_sync_state WHERE chat_id = :id FOR UPDATE"),
            {"id": chat},
        )
        writer.execute(
            text(
                "UPDATE copilot_chat_messages SET seq = CASE message_id WHEN 'c' THEN 0 "
                "WHEN 'a' THEN 1 ELSE 2 END WHERE chat_id = :id"
            ),
            {"id": chat},
        )
        reverse = threading.Thread(target=lambda: done.append(sync_now(sessionmaker, chat)))
        reverse.start()
        time.sleep(1.0)
        writer.commit()
    reverse.join(30)
    assert done and done[0].chats == 1
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT message_id, seq FROM copilot_chat_messages WHERE chat_id = :id "
                "AND deleted_at IS NULL ORDER BY seq"
            ),
            {"id": chat},
        ).all()
    assert [tuple(r) for r in rows] == [("c", 0), ("a", 1), ("b", 2)]
    assert jsonb_ids(engine, chat) == ["c", "a", "b"]


def test_a_step_refuses_rather_than_hold_writers_behind_a_chat_someone_holds(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    set_phase: SetPhase,
    clean: None,
) -> None:
    """Under the phase lock every writer waits: a chat that the step must converge but that a
    long transaction holds makes the step refuse after PHASE_LOCK_WAIT_MS, not wait with every
    writer held; the refusal changes nothing, the pending mark included."""
    set_phase("read_table")
    chat = new_chat(api, auth)
    with engine.begin() as connection:  # behind: a write no sync was sent for
        connection.execute(text(APPEND_STRAY), {"e": STRAY, "id": chat})
    with engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM copilot_chats WHERE id = :id FOR UPDATE"), {"id": chat})
        started = time.monotonic()
        refused = phase_set("table_only", PHASE_LOCK_WAIT_MS="500")
        took = time.monotonic() - started
        holder.rollback()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert "lock was not granted within PHASE_LOCK_WAIT_MS" in refused.stderr, refused.stderr
    # A worker's sync may wait for the held chat too, holding the phase: the pending mark is
    # cleared once its lock wait (WORKER_LOCK_TIMEOUT_MS) ends.
    assert took < 60
    assert current_phase(engine) == ("read_table", None)
