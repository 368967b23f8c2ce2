"""The bulk passes on the worker fleet: the backfill and the rolling full reconcile as chunk
tasks, run by real worker processes on a broker and a database of the test's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text

from harness.processes import RedisServer, WorkerProcess, free_port, wait_until
from tests.conftest import RUN_ID, alembic, create_database, drop_database, start_worker
from tests.support import ROOT, mismatch

CHATS = 120
CHUNK_CHATS = 10  # 12 full chunks and the open one above the last id
# Each worker: quick gates, small chunks, and small first batches so a chunk takes a few.
FLEET = {
    "BULK_CHUNK_CHATS": str(CHUNK_CHATS),
    "BACKFILL_BATCH_SIZE": "4",
    "BACKFILL_PAUSE_SECONDS": "0",
    "PHASE_GATE_MIN_SECONDS": "0",
}


@dataclass
class Legacy:
    url: str
    engine: Engine
    chats: list[str]

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app", *args],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": self.url, **FLEET, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def scalar(self, sql: str, **params: object) -> object:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()


@pytest.fixture()
def legacy() -> Iterator[Legacy]:
    """A database at revision 0001 holding `CHATS` chats of a few messages each."""
    name = f"cdw_bulk_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        alembic(url, "upgrade", "0001")
        chats = []
        with psycopg.connect(url, autocommit=True) as connection:
            for n in range(CHATS):
                messages = [
                    {"id": f"m{i}", "role": "user" if i % 2 else "assistant", "content": f"{n}/{i}"}
                    for i in range(1 + n % 7)
                ]
                row = connection.execute(
                    "INSERT INTO copilot_chats (user_id, model, messages) "
                    "VALUES ('legacy', 'm', %s::jsonb) RETURNING id",
                    (json.dumps(messages),),
                ).fetchone()
                assert row is not None
                chats.append(str(row[0]))
        yield Legacy(url, engine, sorted(chats))
    finally:
        engine.dispose()
        drop_database(name)


def upgrade(url: str, redis_url: str, **env: str) -> str:
    """`alembic upgrade head` with the copy left to the workers."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "BACKFILL_ON_WORKERS": "true",
            **FLEET,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr + result.stdout


def fleet_worker(
    broker: RedisServer, hooks: Path, db: Legacy, name: str, **env: str
) -> WorkerProcess:
    return start_worker(broker, hooks, name, DATABASE_URL=db.url, **FLEET, **env)


def backfill_finished(db: Legacy) -> bool:
    return (
        db.scalar("SELECT state FROM dualwrite_bulk_passes WHERE kind = 'backfill'") == "finished"
    )


def assert_every_chat_converged(db: Legacy) -> None:
    for chat_id in db.chats:
        assert mismatch(db.engine, chat_id) is None, chat_id


class InFlight:
    """Samples the chunk table from its own connection while a pass runs: the most chunks
    ever running, and queued or running, at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.running = 0
        self.in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> InFlight:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        with self.engine.connect() as connection:
            while not self._stop.is_set():
                running, flight = connection.execute(
                    text(
                        "SELECT count(*) FILTER (WHERE state = 'running'), "
                        "count(*) FILTER (WHERE state IN ('queued', 'running')) "
                        "FROM dualwrite_bulk_chunks"
                    )
                ).one()
                connection.rollback()
                self.running = max(self.running, running)
                self.in_flight = max(self.in_flight, flight)
                self._stop.wait(0.02)


def most_at_once(db: Legacy) -> int:
    """The most chunks whose (started, finished) overlap, from the chunk table."""
    with db.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT started_at, finished_at FROM dualwrite_bulk_chunks WHERE state = 'done'")
        ).all()
    events = sorted(
        [(r[0], 1) for r in rows] + [(r[1], -1) for r in rows], key=lambda e: (e[0], e[1])
    )
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def test_a_fleet_backfill_with_two_workers_converges_every_chat_within_the_cap(
    legacy: Legacy, broker: RedisServer, hooks: Path
) -> None:
    log = upgrade(legacy.url, broker.url, BULK_MAX_CONCURRENT_CHUNKS="2")
    assert "left to the workers (BACKFILL_ON_WORKERS)" in log
    assert "2 chunks queued" in log
    assert legacy.scalar("SELECT count(*) FROM copilot_chat_messages") == 0

    shown = legacy.cli("status", REDIS_URL=broker.url)
    assert shown.returncode == 0, shown.stderr
    line = next(li for li in shown.stdout.splitlines() if li.startswith("backfill"))
    assert f"0/{CHATS // CHUNK_CHATS + 1} chunks" in line and "ETA" in line, line
    refused = legacy.cli("phase", "set", "verify_reads", REDIS_URL=broker.url)
    assert refused.returncode == 1
    assert "gate 'backfill finished' failed" in refused.stderr, refused.stderr

    env = {"BULK_MAX_CONCURRENT_CHUNKS": "2"}
    with InFlight(legacy.engine) as seen:
        workers = [fleet_worker(broker, hooks, legacy, f"fleet{n}", **env) for n in (1, 2)]
        try:
            wait_until(lambda: backfill_finished(legacy), 120, what="the fleet backfill")
        finally:
            for worker in workers:
                worker.stop()
    assert_every_chat_converged(legacy)
    assert 1 <= seen.running <= 2 and seen.in_flight <= 2, (seen.running, seen.in_flight)
    assert most_at_once(legacy) <= 2
    # Every chat counted once, in the chunks and in the migration's own state.
    assert legacy.scalar("SELECT sum(chats) FROM dualwrite_bulk_chunks") == CHATS
    copied = legacy.scalar("SELECT count(*) FROM copilot_chat_messages")
    assert legacy.scalar("SELECT sum(rows) FROM dualwrite_bulk_chunks") == copied
    assert legacy.scalar("SELECT finished_at IS NOT NULL FROM dualwrite_backfill")

    shown = legacy.cli("status", REDIS_URL=broker.url)
    assert shown.returncode == 0, shown.stderr
    line = next(li for li in shown.stdout.splitlines() if li.startswith("backfill"))
    assert "finished" in line and f"{copied} rows" in line, line
    moved = legacy.cli("phase", "set", "verify_reads", REDIS_URL=broker.url)
    assert moved.returncode == 0, moved.stderr


def test_a_worker_killed_mid_chunk_leaves_a_pass_that_still_finishes_counted_once(
    legacy: Legacy, broker: RedisServer, hooks: Path
) -> None:
    # The broker is down during the upgrade: the pass is recorded all the same, nothing queued.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    log = upgrade(legacy.url, dead, BULK_MAX_CONCURRENT_CHUNKS="1")
    assert "could not queue" in log
    assert legacy.scalar("SELECT count(*) FROM dualwrite_bulk_chunks WHERE state <> 'pending'") == 0

    # Hold a chat in the middle of the first chunk, as a long transaction of the product would:
    # the chunk copies the batches before it, then waits for that chat's lock.
    held = legacy.chats[CHUNK_CHATS // 2 + 1]
    env = {"BULK_MAX_CONCURRENT_CHUNKS": "1", "MIGRATION_LOCK_TIMEOUT_MS": "120000"}
    with psycopg.connect(legacy.url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(7301, hashtext(%s))", (held,))
        victim = fleet_worker(broker, hooks, legacy, "victim", **env)
        try:
            resumed = legacy.cli("backfill", "resume", REDIS_URL=broker.url, **env)
            assert resumed.returncode == 0, resumed.stderr
            assert "backfill: 1 chunks queued" in resumed.stdout

            def waiting() -> bool:
                return bool(
                    legacy.scalar(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                    )
                )

            wait_until(waiting, 60, what="the chunk to wait for the held chat")
            assert legacy.scalar(
                "SELECT cursor IS NOT NULL AND chats > 0 FROM dualwrite_bulk_chunks "
                "WHERE ordinal = 0 AND state = 'running'"
            ), "the chunk copied its first batches before the held chat"
            victim.kill()  # SIGKILL, mid-chunk
        finally:
            victim.kill()
        holder.execute("SELECT pg_advisory_unlock(7301, hashtext(%s))", (held,))

    rescuer = fleet_worker(broker, hooks, legacy, "rescuer", BULK_MAX_CONCURRENT_CHUNKS="1")
    try:
        # Beat's dispatch (here the operator's `backfill resume`) takes the dead chunk back.
        again = legacy.cli(
            "backfill", "resume", REDIS_URL=broker.url, BULK_MAX_CONCURRENT_CHUNKS="1"
        )
        assert again.returncode == 0, again.stderr
        wait_until(lambda: backfill_finished(legacy), 120, what="the pass after the kill")
    finally:
        rescuer.stop()

    assert_every_chat_converged(legacy)
    with legacy.engine.connect() as connection:
        first = connection.execute(
            text("SELECT attempts, chats, state FROM dualwrite_bulk_chunks WHERE ordinal = 0")
        ).one()
    assert first.state == "done"
    assert first.attempts == 2  # the killed claim and the one that finished
    assert first.chats == CHUNK_CHATS  # the batches before the kill were not counted twice
    assert legacy.scalar("SELECT sum(chats) FROM dualwrite_bulk_chunks") == CHATS
    copied = legacy.scalar("SELECT count(*) FROM copilot_chat_messages")
    assert legacy.scalar("SELECT sum(rows) FROM dualwrite_bulk_chunks") == copied


def test_a_rolling_reconcile_over_three_nights_covers_every_chat_and_gates_read_table(
    legacy: Legacy, broker: RedisServer, hooks: Path
) -> None:
    alembic(legacy.url, "upgrade", "head")  # the single-machine install: copied in the upgrade
    assert_every_chat_converged(legacy)
    with legacy.engine.begin() as connection:
        # Drift in every chat (rows lost behind the sync state's back), and verify_reads.
        connection.execute(text("DELETE FROM copilot_chat_messages"))
        connection.execute(
            text(
                "UPDATE dualwrite_phase SET phase = 'verify_reads', "
                "since = now() - interval '1 day'"
            )
        )
    env = {"RECONCILE_FULL_DAYS": "3", "BULK_MAX_CONCURRENT_CHUNKS": "2"}
    worker = fleet_worker(broker, hooks, legacy, "nightly", **env)
    chunks = CHATS // CHUNK_CHATS + 1
    try:
        from app.broker import producer
        from app.settings import Settings

        sender = producer(Settings(redis_url=broker.url))
        for night in (1, 2, 3):
            sender.send_task("chats.reconcile", kwargs={"rolling": True})
            released = min(chunks, night * -(-chunks // 3))

            def done(released: int = released) -> bool:
                return (
                    legacy.scalar("SELECT count(*) FROM dualwrite_bulk_chunks WHERE state = 'done'")
                    == released
                )

            wait_until(done, 90, what=f"night {night}'s share")
            gate = legacy.cli("phase", REDIS_URL=broker.url, **env)
            line = next(li for li in gate.stdout.splitlines() if "clean reconcile" in li)
            left = [c for c in legacy.chats if mismatch(legacy.engine, c) is not None]
            if night < 3:
                assert line.startswith("  [no] clean reconcile"), line
                assert f"{released}/{chunks} chunks done" in line, line
                assert left, "the unreleased chunks are not reconciled yet"
                refused = legacy.cli("phase", "set", "read_table", REDIS_URL=broker.url, **env)
                assert refused.returncode == 1 and "clean reconcile" in refused.stderr
            else:
                assert line.startswith("  [ok] clean reconcile: rolling pass #"), line
                assert not left, left[:3]
        shown = legacy.cli("status", REDIS_URL=broker.url, **env)
        line = next(li for li in shown.stdout.splitlines() if li.startswith("rolling reconcile"))
        assert f"finished: {chunks}/{chunks} chunks" in line, line
        moved = legacy.cli("phase", "set", "read_table", REDIS_URL=broker.url, **env)
        assert moved.returncode == 0, moved.stderr
    finally:
        worker.stop()


def test_a_paused_backfill_queues_no_chunk_until_it_is_resumed(
    legacy: Legacy, broker: RedisServer
) -> None:
    upgrade(legacy.url, f"redis://127.0.0.1:{free_port()}/0", BULK_MAX_CONCURRENT_CHUNKS="2")
    paused = legacy.cli("bulk", "pause", "backfill")
    assert paused.returncode == 0, paused.stderr
    assert "backfill: paused" in paused.stdout

    held = legacy.cli("backfill", "resume", REDIS_URL=broker.url)
    assert held.returncode == 0, held.stderr
    assert "backfill: 0 chunks queued" in held.stdout
    assert "backfill: pass #1 paused: 0/" in held.stdout
    assert broker.client().llen("dualwrite.maintenance") == 0

    legacy.cli("bulk", "resume", "backfill")
    going = legacy.cli("backfill", "resume", REDIS_URL=broker.url)
    assert "backfill: 2 chunks queued" in going.stdout, going.stdout
    assert "backfill: pass #1 active: 0/" in going.stdout
    assert broker.client().llen("dualwrite.maintenance") == 2


def test_a_resume_as_the_last_chunk_finishes_starts_no_second_copy(
    legacy: Legacy, broker: RedisServer
) -> None:
    """`backfill resume` read while the dispatch that finishes the pass commits: it must see
    the copy either unfinished with its pass open, or finished, never the copy unfinished and
    then no pass open, which would start the whole copy again."""
    from sqlalchemy import event

    from app.db import make_sessionmaker, transaction
    from app.services import bulk_passes
    from app.settings import Settings

    upgrade(legacy.url, broker.url)
    with legacy.engine.begin() as connection:  # the fleet has copied every chunk
        connection.execute(text("UPDATE dualwrite_bulk_chunks SET state = 'done'"))
    factory = make_sessionmaker(legacy.engine)
    settings = Settings(database_url=legacy.url, redis_url=broker.url)
    read_unfinished = threading.Event()

    def finish_the_pass() -> None:
        with transaction(factory) as session:
            bulk_passes.dispatch(session, settings)  # settles the pass: finished, copy finished
            read_unfinished.wait(3)  # commit between the resume's reads, if they can interleave

    finisher = threading.Thread(target=finish_the_pass)

    def after_read(conn: object, cursor: object, statement: str, *_: object) -> None:
        if "FROM dualwrite_backfill" in statement and "finished_at IS NULL" in statement:
            read_unfinished.set()
            finisher.join(10)

    resume_engine = create_engine(legacy.url.replace("postgresql://", "postgresql+psycopg://"))
    event.listen(resume_engine, "after_cursor_execute", after_read)
    try:
        finisher.start()
        wait_until(
            lambda: legacy.scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            timeout=10,
        )
        with transaction(make_sessionmaker(resume_engine)) as session:
            started = bulk_passes.start_backfill(session, settings, trigger="cli")
    finally:
        finisher.join(10)
        resume_engine.dispose()
    assert started is None
    assert legacy.scalar("SELECT count(*) FROM dualwrite_bulk_passes") == 1
    assert legacy.scalar("SELECT state FROM dualwrite_bulk_passes") == "finished"
