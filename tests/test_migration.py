"""The expand migration runs online: writers keep going while it runs, it resumes after a kill,
and the version trigger makes every writer's change reach the table through the sweep alone."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text

from app.settings import Settings
from harness.processes import WorkerProcess
from tasks.publish import producer
from tests.conftest import (
    RUN_ID,
    RedisServer,
    alembic,
    create_database,
    drop_database,
    start_worker,
)
from tests.support import ROOT, mismatch, wait_converged, wait_until

# Small batches with a pause between them: the backfill takes many batches, long enough for
# writers to run between them.
SLOW_BACKFILL = {
    "BACKFILL_BATCH_SIZE": "4",
    "BACKFILL_MAX_BATCH_SIZE": "4",
    "BACKFILL_PAUSE_SECONDS": "0.03",
    "BACKFILL_LOG_INTERVAL_SECONDS": "0",
    "MIGRATION_LOCK_TIMEOUT_MS": "300",
}

LOAD = """
INSERT INTO copilot_chats (user_id, model, messages, created_at)
SELECT 'legacy', 'm',
       (SELECT jsonb_agg(jsonb_build_object(
                   'id', 'm' || i, 'role', CASE WHEN i %% 2 = 0 THEN 'user' ELSE 'assistant' END,
                   'content', repeat('x', 200), 'timestamp', '2025-01-01T00:00:00Z') ORDER BY i)
        FROM generate_series(1, %(messages)s) AS i),
       now() - interval '1 day'
FROM generate_series(1, %(chats)s)
"""


@dataclass
class Legacy:
    url: str
    engine: Engine
    chat_ids: list[str]


@pytest.fixture()
def legacy() -> Iterator[Legacy]:
    """A database at revision 0001 (before this service) holding 160 chats of 30 messages."""
    name = f"cdw_online_{RUN_ID}"
    url = create_database(name)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        alembic(url, "upgrade", "0001")
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(LOAD, {"chats": 160, "messages": 30})
            ids = [str(r[0]) for r in connection.execute("SELECT id FROM copilot_chats")]
        yield Legacy(url, engine, ids)
    finally:
        engine.dispose()
        drop_database(name)


def start_upgrade(url: str, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """`alembic upgrade head` in a process group of its own, its log in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": url, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(process: subprocess.Popen[bytes], log_path: Path, timeout: float = 180) -> str:
    assert process.wait(timeout) == 0, log_path.read_text()
    return log_path.read_text()


@dataclass
class OldApp:
    """The previous release, or a script: writes `messages` with plain SQL, knowing nothing of
    versions or sync state. Records how long each statement took and when it committed."""

    url: str
    chat_ids: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    durations: list[float] = field(default_factory=list)
    commits: list[object] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(self.url, autocommit=True) as connection:
                while not self.stop.is_set():
                    self._one(connection, rng)
        except BaseException as error:  # surfaced by the test
            self.errors.append(error)

    def _one(self, connection: psycopg.Connection[tuple[object, ...]], rng: random.Random) -> None:
        chat = rng.choice(self.chat_ids)
        kind = rng.random()
        started = time.perf_counter()
        if kind < 0.7:  # append one message
            row = connection.execute(
                "UPDATE copilot_chats SET messages = messages || jsonb_build_array("
                "jsonb_build_object('id', %s::text, 'role', 'user', 'content', 'hi')), "
                "updated_at = now() WHERE id = %s RETURNING clock_timestamp()",
                (uuid.uuid4().hex, chat),
            ).fetchone()
        elif kind < 0.8:  # drop the first message
            row = connection.execute(
                "UPDATE copilot_chats SET messages = messages - 0 WHERE id = %s "
                "RETURNING clock_timestamp()",
                (chat,),
            ).fetchone()
        elif kind < 0.9:  # a new chat with a transcript
            row = connection.execute(
                "INSERT INTO copilot_chats (user_id, model, messages) VALUES ('old', 'm', "
                "jsonb_build_array(jsonb_build_object('id', 'n1', 'role', 'user', "
                "'content', 'new'))) RETURNING clock_timestamp(), id"
            ).fetchone()
            assert row is not None
            self.created.append(str(row[1]))
        else:  # a plain read
            row = connection.execute(
                "SELECT clock_timestamp() FROM copilot_chats WHERE id = %s", (chat,)
            ).fetchone()
        self.durations.append(time.perf_counter() - started)
        assert row is not None
        self.commits.append(row[0])


def sweep_until_converged(broker: RedisServer, url: str, chat_ids: list[str]) -> None:
    """Run the sweep on a real worker (grace 0) against `url` until every chat is converged."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        sender = producer(Settings(redis_url=broker.url))

        def converged() -> bool:
            sender.send_task("chats.sweep")
            with engine.connect() as connection:
                behind = connection.execute(
                    text(
                        "SELECT count(*) FROM copilot_chat_sync_state "
                        "WHERE applied_version < wanted_version "
                        "AND chat_id = ANY(CAST(:ids AS uuid[]))"
                    ),
                    {"ids": chat_ids},
                ).scalar_one()
            return bool(behind == 0)

        wait_until(converged, timeout=90, interval=0.5)
        wait_converged(engine, chat_ids, timeout=30)
    finally:
        engine.dispose()


def test_migration_under_concurrent_writes_blocks_nobody_and_loses_nothing(
    legacy: Legacy, broker: RedisServer, hooks: Path, tmp_path: Path
) -> None:
    old = OldApp(legacy.url, legacy.chat_ids)
    writers = [threading.Thread(target=old.run, args=(seed,)) for seed in range(2)]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: len(old.commits) >= 20, timeout=30)
        log = finish(
            start_upgrade(legacy.url, tmp_path / "upgrade.log", **SLOW_BACKFILL),
            tmp_path / "upgrade.log",
        )
        during = len(old.commits)
        wait_until(lambda: len(old.commits) >= during + 20, timeout=30)
    finally:
        old.stop.set()
        for writer in writers:
            writer.join(30)
    assert not old.errors, old.errors

    with legacy.engine.connect() as connection:
        started, finished, done, total = connection.execute(
            text("SELECT started_at, finished_at, chats_done, total_chats FROM dualwrite_backfill")
        ).one()
    # The backfill took many batches, and the old application's statements committed between
    # them: nothing held a lock that blocks writers for the length of the copy.
    # Its work is the chats that existed when it started, including those the old application
    # created before that (a chat whose insert was in flight at the start may join them);
    # chats created later are the trigger's and the sweep's.
    assert done >= total >= len(legacy.chat_ids), log
    assert f"backfill: 4/{total} chats" in log and "ETA" in log
    committed_during = [t for t in old.commits if started <= t <= finished]
    assert len(committed_during) >= 10, (started, finished, len(old.commits))
    assert max(old.durations) < 5.0, max(old.durations)  # lock_timeout is 0.3 s; 5 s is slack

    # No chat claims to be in sync while its rows differ: each one written during the
    # migration is recorded as behind, for the sweep.
    every_chat = legacy.chat_ids + old.created
    with legacy.engine.connect() as connection:
        in_sync = set(
            connection.execute(
                text(
                    "SELECT chat_id::text FROM copilot_chat_sync_state "
                    "WHERE applied_version >= wanted_version"
                )
            ).scalars()
        )
    wrong = [c for c in every_chat if c in in_sync and mismatch(legacy.engine, c) is not None]
    assert wrong == []
    assert len(in_sync) < len(every_chat)  # some were written during the copy

    worker = start_worker(broker, hooks, "online", DATABASE_URL=legacy.url)
    try:
        sweep_until_converged(broker, legacy.url, every_chat)
    finally:
        worker.stop()


def rows_xmin(engine: Engine) -> dict[tuple[str, str], str]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT chat_id::text, message_id, xmin::text FROM copilot_chat_messages")
        ).all()
    return {(r[0], r[1]): r[2] for r in rows}


def test_backfill_resumes_after_a_kill_and_copies_nothing_twice(
    legacy: Legacy, tmp_path: Path
) -> None:
    process = start_upgrade(legacy.url, tmp_path / "first.log", **SLOW_BACKFILL)
    try:

        def halfway() -> bool:
            with legacy.engine.connect() as connection:
                exists = connection.execute(
                    text("SELECT to_regclass('dualwrite_backfill') IS NOT NULL")
                ).scalar_one()
                if not exists:
                    return False
                done = connection.execute(
                    text("SELECT coalesce(max(chats_done), 0) FROM dualwrite_backfill")
                ).scalar_one()
            return bool(done >= 60)

        wait_until(halfway, timeout=60)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def killed_backend_gone() -> bool:
        # A batch in flight when its client died is rolled back, or committed if its COMMIT
        # was already sent; wait for the server to settle it.
        with legacy.engine.connect() as connection:
            busy = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                    "AND state <> 'idle'"
                )
            ).scalar_one()
        return bool(busy == 0)

    wait_until(killed_backend_gone, timeout=30)

    with legacy.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
            "0001"
        )
        done_before, finished = connection.execute(
            text("SELECT chats_done, finished_at FROM dualwrite_backfill")
        ).one()
    assert 60 <= done_before < len(legacy.chat_ids) and finished is None
    copied_before = rows_xmin(legacy.engine)
    assert len(copied_before) == done_before * 30

    log = finish(
        start_upgrade(legacy.url, tmp_path / "second.log", **SLOW_BACKFILL), tmp_path / "second.log"
    )
    assert f"backfill: resuming after {done_before} of 160 chats" in log

    after = rows_xmin(legacy.engine)
    # Rows copied before the kill were not written again, and every chat is copied once.
    assert {k: after[k] for k in copied_before} == copied_before
    assert len(after) == 160 * 30
    with legacy.engine.connect() as connection:
        rows_copied, version = connection.execute(
            text(
                "SELECT rows_copied, (SELECT version_num FROM alembic_version) "
                "FROM dualwrite_backfill"
            )
        ).one()
    assert rows_copied == 160 * 30 and version != "0001"
    for chat in legacy.chat_ids:
        assert mismatch(legacy.engine, chat) is None

    alembic(legacy.url, "downgrade", "0001")
    alembic(legacy.url, "upgrade", "head")
    assert len(rows_xmin(legacy.engine)) == 160 * 30


def test_trigger_bumps_the_version_whoever_writes(engine: Engine) -> None:
    with engine.begin() as connection:
        empty = connection.execute(
            text(
                "INSERT INTO copilot_chats (user_id, model) VALUES ('t', 'm') "
                "RETURNING id, messages_version"
            )
        ).one()
        full = connection.execute(
            text(
                "INSERT INTO copilot_chats (user_id, model, messages) "
                """VALUES ('t', 'm', '[{"id": "a"}]') RETURNING id, messages_version"""
            )
        ).one()
        assert empty.messages_version == 0 and full.messages_version == 1

        def state(chat: uuid.UUID) -> tuple[int, int, int]:
            return tuple(
                connection.execute(
                    text(
                        "SELECT c.messages_version, s.wanted_version, s.applied_version "
                        "FROM copilot_chats c JOIN copilot_chat_sync_state s ON s.chat_id = c.id "
                        "WHERE c.id = :id"
                    ),
                    {"id": chat},
                ).one()
            )

        assert state(empty.id) == (0, 0, 0)  # nothing to copy
        assert state(full.id) == (1, 1, -1)
        # An old release that bumps by hand still moves one version per write.
        connection.execute(
            text(
                'UPDATE copilot_chats SET messages = messages || \'[{"id": "b"}]\', '
                "messages_version = messages_version + 1 WHERE id = :id"
            ),
            {"id": full.id},
        )
        assert state(full.id) == (2, 2, -1)
        # A write that leaves `messages` out of its SET is not a new version.
        connection.execute(
            text("UPDATE copilot_chats SET title = 'x' WHERE id = :id"), {"id": full.id}
        )
        assert state(full.id) == (2, 2, -1)
        connection.execute(
            text("UPDATE copilot_chats SET messages = '[]' WHERE id = :id"), {"id": empty.id}
        )
        assert state(empty.id) == (1, 1, 0)


def test_old_application_writes_reach_the_table_through_the_sweep_alone(
    engine: Engine,
    broker: RedisServer,
    fault_worker: WorkerProcess,
) -> None:
    old = OldApp(os.environ["DATABASE_URL"], [])
    with psycopg.connect(old.url, autocommit=True) as connection:
        chats = [
            str(
                connection.execute(
                    "INSERT INTO copilot_chats (user_id, model, messages) VALUES ('old', 'm', "
                    """'[{"id": "a", "role": "user", "content": "1"}]') RETURNING id"""
                ).fetchone()[0]  # type: ignore[index]
            )
            for _ in range(6)
        ]
    old.chat_ids = chats
    rng = random.Random(3)
    with psycopg.connect(old.url, autocommit=True) as connection:
        for _ in range(60):
            old._one(connection, rng)
        # A whole snapshot replace, as an old script would do it.
        connection.execute(
            """UPDATE copilot_chats SET messages = '[{"id": "z", "role": "user", "content": "r"}]'
            WHERE id = %s""",
            (chats[0],),
        )
    every_chat = chats + old.created
    assert any(mismatch(engine, c) is not None for c in every_chat)
    # No task was published for any of these writes; no reconcile runs: the sweep alone.
    sweep_until_converged(broker, old.url, every_chat)


def test_an_upgrade_killed_after_the_operator_tables_runs_again(legacy: Legacy) -> None:
    """Revision 0003 commits its tables before building its index concurrently and records
    itself after: a kill in between leaves the tables and, at worst, an invalid index."""
    alembic(legacy.url, "upgrade", "0002")
    with psycopg.connect(legacy.url, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE dualwrite_dead_letters (id bigserial PRIMARY KEY, task text NOT NULL, "
            "chat_id uuid NOT NULL, args jsonb NOT NULL, reason text NOT NULL, error text NOT "
            "NULL, attempts int NOT NULL DEFAULT 1, first_seen timestamptz NOT NULL DEFAULT "
            "now(), last_seen timestamptz NOT NULL DEFAULT now(), replayed_at timestamptz, "
            "resolved_at timestamptz)"
        )
        connection.execute("CREATE INDEX copilot_chats_updated_at_idx ON copilot_chats (id)")
        connection.execute(  # what a killed CONCURRENTLY build leaves: an invalid index
            "UPDATE pg_index SET indisvalid = false "
            "WHERE indexrelid = 'copilot_chats_updated_at_idx'::regclass"
        )
    alembic(legacy.url, "upgrade", "head")
    with psycopg.connect(legacy.url) as connection:
        valid = connection.execute(
            "SELECT indisvalid, pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indexrelid = 'copilot_chats_updated_at_idx'::regclass"
        ).fetchone()
    assert valid is not None and valid[0] and "(updated_at)" in valid[1]


def test_message_timestamps_parse_under_a_parallel_plan(engine: Engine) -> None:
    """The function's EXCEPTION block is a subtransaction, which a parallel operation refuses:
    a statement the planner makes parallel must still parse every element's timestamp."""
    values = [
        '"2024-05-01T10:00:00.123Z"',  # what clients send
        '"2024-02-30T00:00:00Z"',  # looks like a date, is not one: the block catches the cast
        '"  2024-05-01 10:00:00+02"',
        '"later"',
        "17",
    ]
    query = text(
        "SELECT v, copilot_message_timestamp(v::jsonb) "
        "FROM unnest(CAST(:values AS text[])) v, generate_series(1, 2000) "
        "ORDER BY v"
    )
    with engine.begin() as connection:
        serial = connection.execute(query, {"values": values}).all()
    with engine.begin() as connection:
        forcing = (
            "debug_parallel_query"
            if int(connection.execute(text("SHOW server_version_num")).scalar_one()) >= 160000
            else "force_parallel_mode"
        )
        for setting in (
            f"{forcing} = on",
            "parallel_setup_cost = 0",
            "parallel_tuple_cost = 0",
            "min_parallel_table_scan_size = 0",
        ):
            connection.execute(text(f"SET LOCAL {setting}"))
        parallel = connection.execute(query, {"values": values}).all()
    assert parallel == serial
    parsed = {v: when for v, when in serial}
    assert parsed['"2024-05-01T10:00:00.123Z"'] is not None
    assert parsed['"2024-02-30T00:00:00Z"'] is None and parsed['"later"'] is None
