"""The reconcile: drift made by hand is found exactly, repaired and recorded; one run at a time;
a run racing live writes never leaves old data behind. Real PostgreSQL, Redis, worker and CLI."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app.db import transaction
from app.jobs import SYNC_CHAT
from app.repositories import chats as chats_repo
from app.repositories import dead_letters
from app.repositories.sync_state import SYNC_LOCK_CLASS
from app.services.reconcile import LOCK_KEY, Limits, reconcile
from tests.support import (
    ROOT,
    AuthHeaders,
    SessionFactory,
    SetPhase,
    WaitConverged,
    assert_converged,
    dumps,
    table_rows,
    wait_until,
)
from tests.test_handlers import message, new_chat

DSN = os.environ["DATABASE_URL"]  # set by conftest before this module is imported
LOG_DIR = ROOT / ".run" / "test-logs"


# ---------------------------------------------------------------------------------------------
# The CLI, run as an operator runs it.


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def start_cli(*args: str, **env: str) -> subprocess.Popen[str]:
    """`python -m app ARGS` in its own process, with this run's environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env=cli_env(**env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(*args: str, timeout: float = 120.0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env=cli_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary(stdout: str) -> dict[str, str]:
    """The summary table printed at the end of `reconcile`, as {column: value}."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("chats "))
    headers = re.split(r"\s{2,}", lines[at].strip())
    values = re.split(r"\s{2,}", lines[at + 2].strip())
    return dict(zip(headers, values, strict=True))


def printed_run_id(stdout: str) -> int:
    found = re.search(r"^reconcile #(\d+): ", stdout, re.MULTILINE)
    assert found, stdout
    return int(found.group(1))


# ---------------------------------------------------------------------------------------------
# Chats made through the API, and drift made by hand behind its back.


def seed(
    api: TestClient, auth: AuthHeaders, count: int, size: int = 4
) -> dict[str, list[dict[str, Any]]]:
    """`count` chats of `size` messages each, written through the API (the worker copies them)."""
    chats = {}
    for _ in range(count):
        chat_id = new_chat(api, auth)
        sent = [
            message("user" if i % 2 == 0 else "assistant", content=f"turn {i}") for i in range(size)
        ]
        response = api.put(f"/chats/{chat_id}/messages", json={"messages": sent}, headers=auth())
        assert response.status_code == 200, response.text
        chats[chat_id] = sent
    return chats


def execute(engine: Engine, sql: str, **params: Any) -> int:
    with engine.begin() as connection:
        return int(connection.execute(text(sql), params).rowcount)


def drop_row(engine: Engine, chat_id: str, message_id: str) -> None:
    sql = "DELETE FROM copilot_chat_messages WHERE chat_id = :c AND message_id = :m"
    assert execute(engine, sql, c=chat_id, m=message_id) == 1


def change_content(engine: Engine, chat_id: str, message_id: str) -> None:
    sql = (
        "UPDATE copilot_chat_messages SET content = jsonb_set(content, '{content}', "
        "'\"tampered\"') WHERE chat_id = :c AND message_id = :m AND deleted_at IS NULL"
    )
    assert execute(engine, sql, c=chat_id, m=message_id) == 1


def add_extra_row(engine: Engine, chat_id: str, message_id: str = "ghost") -> None:
    """A live row whose message id is nowhere in the chat's JSONB."""
    sql = """
        INSERT INTO copilot_chat_messages
            (chat_id, message_id, role, seq, content, created_at, updated_at, source_version)
        SELECT id, CAST(:m AS text), 'user', 99,
               jsonb_build_object('id', CAST(:m AS text), 'role', 'user'), now(), now(),
               messages_version
        FROM copilot_chats WHERE id = :c
    """
    assert execute(engine, sql, c=chat_id, m=message_id) == 1


def swap_seq(engine: Engine, chat_id: str, first: str, second: str) -> None:
    sql = """
        UPDATE copilot_chat_messages m SET seq = o.seq
        FROM copilot_chat_messages o
        WHERE m.chat_id = :c AND o.chat_id = :c
          AND ((m.message_id = :a AND o.message_id = :b)
               OR (m.message_id = :b AND o.message_id = :a))
    """
    assert execute(engine, sql, c=chat_id, a=first, b=second) == 2


def soft_delete(engine: Engine, chat_id: str, message_id: str) -> None:
    """Soft-delete the row of a message that is still in the JSONB."""
    sql = (
        "UPDATE copilot_chat_messages SET deleted_at = now() "
        "WHERE chat_id = :c AND message_id = :m AND deleted_at IS NULL"
    )
    assert execute(engine, sql, c=chat_id, m=message_id) == 1


def bring_back(engine: Engine, chat_id: str, element: dict[str, Any]) -> None:
    """Put a removed message back into the JSONB with plain SQL, as a writer that knows nothing
    of the dual-write would: the trigger records the new version, so the chat is behind."""
    sql = """
        UPDATE copilot_chats SET messages = messages || CAST(:e AS jsonb), updated_at = now()
        WHERE id = :c
    """
    assert execute(engine, sql, c=chat_id, e=dumps([element])) == 1


def every_row(engine: Engine) -> list[tuple[Any, ...]]:
    """Everything the reconcile could touch, for "nothing changed" assertions."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT chat_id, message_id, role, seq, content::text, stream_id, model, "
                "created_at, updated_at, deleted_at, source_version FROM copilot_chat_messages "
                "ORDER BY chat_id, message_id"
            )
        ).all()
        chats = connection.execute(
            text(
                "SELECT c.id, c.messages::text, c.messages_version, c.updated_at, "
                "s.wanted_version, s.applied_version FROM copilot_chats c "
                "LEFT JOIN copilot_chat_sync_state s ON s.chat_id = c.id ORDER BY c.id"
            )
        ).all()
    return [tuple(r) for r in rows] + [tuple(c) for c in chats]


def run_row(engine: Engine, run_id: int) -> dict[str, Any]:
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text("SELECT * FROM dualwrite_reconcile_runs WHERE id = :id"), {"id": run_id}
            )
            .mappings()
            .one()
        )


def run_ids(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT id FROM dualwrite_reconcile_runs ORDER BY id")
            ).scalars()
        )


def drifted_set(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> tuple[list[str], dict[str, tuple[int, int, int]]]:
    """Four converged chats, then drift of every kind made by hand in three of them.

    Returns the chat ids and, per drifted chat, the expected (missing, stale, extra).
    """
    chats = seed(api, auth, 4)
    ids = sorted(chats)
    a, b, c, _quiet = ids
    converged(*ids)
    # Chat c then loses its last message through the API, so its row is soft-deleted.
    shorter = chats[c][:3]
    response = api.put(f"/chats/{c}/messages", json={"messages": shorter}, headers=auth())
    assert response.status_code == 200, response.text
    converged(*ids)
    assert table_rows(engine, c)[1] == {chats[c][3]["id"]}

    drop_row(engine, a, chats[a][0]["id"])  # a row deleted: 1 missing
    change_content(engine, a, chats[a][1]["id"])  # content changed: 1 stale
    add_extra_row(engine, b)  # a live row whose message is not in the JSONB: 1 extra
    swap_seq(engine, b, chats[b][2]["id"], chats[b][3]["id"])  # order scrambled: 2 stale
    soft_delete(engine, c, chats[c][0]["id"])  # a soft-deleted row whose message is there
    return ids, {a: (1, 1, 0), b: (0, 2, 1), c: (0, 1, 0)}


# ---------------------------------------------------------------------------------------------


def test_dry_run_finds_every_kind_of_drift_exactly_and_a_run_repairs_it(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
    clean: None,
) -> None:
    ids, _ = drifted_set(api, auth, engine, converged)
    before = every_row(engine)

    dry = run_cli("reconcile", "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "dry run (nothing changed), all chats" in dry.stdout
    found = summary(dry.stdout)
    assert (found["missing"], found["stale"], found["extra"], found["drift"]) == (
        "1",
        "4",
        "1",
        "6",
    )
    assert (found["chats"], found["messages"], found["bad elements"]) == ("4", "15", "0")
    assert every_row(engine) == before, "a dry run changed something"
    dry_run = run_row(engine, printed_run_id(dry.stdout))
    assert dry_run["dry_run"] and dry_run["outcome"] == "drift"
    assert (dry_run["inserted"], dry_run["updated"], dry_run["soft_deleted"]) == (1, 4, 1)

    repair = run_cli("reconcile", "--batch-size", "3")  # two batches: keyset pagination
    assert repair.returncode == 0, repair.stdout + repair.stderr
    done = summary(repair.stdout)
    assert (done["inserted"], done["updated"], done["soft-deleted"], done["drift"]) == (
        "1",
        "4",
        "1",
        "6",
    )
    assert_converged(engine, ids)
    live, deleted = table_rows(engine, ids[1])
    assert "ghost" in deleted and "ghost" not in live  # soft-deleted, not removed

    again = run_cli("reconcile", "--dry-run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again.stdout)["drift"] == "0"

    # Every run is recorded with its totals.
    runs = [run_row(engine, printed_run_id(r.stdout)) for r in (dry, repair, again)]
    recorded = [
        (
            r["dry_run"],
            r["outcome"],
            r["chats_scanned"],
            r["messages_scanned"],
            r["bad_elements"],
            r["inserted"],
            r["updated"],
            r["soft_deleted"],
            r["drift"],
            r["since"],
            r["trigger"],
        )
        for r in runs
    ]
    assert recorded == [
        (True, "drift", 4, 15, 0, 1, 4, 1, 6, None, "cli"),
        (False, "ok", 4, 15, 0, 1, 4, 1, 6, None, "cli"),
        (True, "ok", 4, 15, 0, 0, 0, 0, 0, None, "cli"),
    ]
    for r in runs:
        assert r["finished_at"] >= r["started_at"] and r["duration_seconds"] >= 0
        assert r["error"] is None


def test_a_chat_merely_behind_is_lag_not_drift(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged, clean: None
) -> None:
    chats = seed(api, auth, 2)
    behind, drifted = sorted(chats)
    converged(behind, drifted)
    change_content(engine, drifted, chats[drifted][1]["id"])  # rows claim current: drift
    # A write whose sync has not run yet (its task is never published here): lag.
    bring_back(engine, behind, {"id": "late", "role": "user", "content": "late"})

    dry = run_cli("reconcile", "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    found = summary(dry.stdout)
    assert (found["drift"], found["behind"]) == ("1", "1"), dry.stdout
    assert "1 chats were merely behind" in dry.stdout
    assert run_row(engine, printed_run_id(dry.stdout))["chats_behind"] == 1

    repair = run_cli("reconcile")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert (summary(repair.stdout)["drift"], summary(repair.stdout)["behind"]) == ("1", "1")
    assert_converged(engine, [behind, drifted])
    clean_run = run_cli("reconcile", "--dry-run")
    assert clean_run.returncode == 0 and summary(clean_run.stdout)["drift"] == "0"


LAG = (
    "1 chats were merely behind (their JSONB changed after their copy and a sync is on its way: "
    "live traffic, left to their sync); not drift"
)


def test_in_jsonb_only_every_difference_is_drift_to_check_and_to_a_dry_run_alike(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
    clean: None,
    set_phase: SetPhase,
) -> None:
    chats = seed(api, auth, 2)
    written, quiet = sorted(chats)
    converged(written, quiet)
    set_phase("jsonb_only")
    # Committed to the JSONB; in this phase no sync is sent and the sweep copies nothing.
    response = api.post(f"/chats/{written}/messages", json={"message": message()}, headers=auth())
    assert response.status_code == 201, response.text
    stalled = "1 chats were behind with no sync on its way (nothing copies in jsonb_only): drift"

    dry = run_cli("reconcile", "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    found = summary(dry.stdout)
    assert (found["missing"], found["drift"], found["behind"]) == ("1", "1", "0"), dry.stdout
    assert stalled in dry.stdout.splitlines(), dry.stdout
    assert "left to their sync" not in dry.stdout
    assert run_row(engine, printed_run_id(dry.stdout))["outcome"] == "drift"

    check = run_cli("check")
    assert check.returncode == 1, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert any(
        line.startswith(written)
        and line.endswith("(behind, no sync on its way): 1 missing, 0 stale, 0 extra")
        for line in lines
    ), lines
    assert stalled in lines
    assert lines[-1] == "drift: 1 rows in 1 chats"

    repair = run_cli("reconcile")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert (summary(repair.stdout)["inserted"], summary(repair.stdout)["drift"]) == ("1", "1")
    assert f"{stalled}; repaired here" in repair.stdout.splitlines()
    assert_converged(engine, [written, quiet])
    assert run_cli("reconcile", "--dry-run").returncode == 0
    assert run_cli("check").returncode == 0


def test_a_chat_behind_that_the_sweep_skips_is_drift_not_lag(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    (chat,) = seed(api, auth, 1)
    converged(chat)
    # A write whose sync has not run yet (its task is never published here): the sweep's.
    bring_back(engine, chat, {"id": "late", "role": "user", "content": "late"})
    for args in (("reconcile", "--dry-run"), ("check",)):
        lag = run_cli(*args)
        assert lag.returncode == 0, lag.stdout + lag.stderr
        assert LAG in lag.stdout.splitlines(), lag.stdout

    # Its sync failed for good: the sweep skips the chat until an operator replays it.
    with transaction(sessionmaker) as session:
        dead_letters.record(
            session,
            task=SYNC_CHAT,
            chat_id=uuid.UUID(chat),
            args=[chat, 1],
            reason=dead_letters.Reason.FAILED,
            error="gave up",
            attempts=4,
        )
    stalled = (
        "1 chats were behind with no sync on its way (an open failed or worker_lost dead letter "
        "keeps the sweep off them; see dead-letters list): drift"
    )
    dry = run_cli("reconcile", "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert (summary(dry.stdout)["drift"], summary(dry.stdout)["behind"]) == ("1", "0")
    assert stalled in dry.stdout.splitlines(), dry.stdout
    check = run_cli("check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert stalled in check.stdout.splitlines(), check.stdout
    assert check.stdout.splitlines()[-1] == "drift: 1 rows in 1 chats"

    repair = run_cli("reconcile")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert f"{stalled}; repaired here" in repair.stdout.splitlines()
    assert_converged(engine, [chat])
    assert run_cli("check").returncode == 0


def test_since_only_touches_recently_updated_chats(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    chats = seed(api, auth, 4, size=2)
    ids = sorted(chats)
    converged(*ids)
    old, recent = ids[:2], ids[2:]
    sql = "UPDATE copilot_chats SET updated_at = now() - interval '30 days' WHERE id = :c"
    for chat_id in old:
        execute(engine, sql, c=chat_id)
    for chat_id in ids:
        drop_row(engine, chat_id, chats[chat_id][0]["id"])

    report = reconcile(sessionmaker, since=timedelta(days=7), batch_size=1)
    assert report is not None
    assert (report.chats, report.messages, report.inserted, report.drift) == (2, 4, 2, 2)
    assert_converged(engine, recent)
    for chat_id in old:  # outside the window: left alone
        assert chats[chat_id][0]["id"] not in table_rows(engine, chat_id)[0]
    recorded = run_row(engine, report.run_id)
    assert (recorded["since"], recorded["chats_scanned"], recorded["inserted"]) == (
        timedelta(days=7),
        2,
        2,
    )

    everything = reconcile(sessionmaker, batch_size=1)
    assert everything is not None
    assert (everything.chats, everything.inserted) == (4, 2)
    assert_converged(engine, ids)


@pytest.fixture()
def reconcile_lock() -> Iterator[psycopg.Connection[Any]]:
    """Another reconcile, as far as the database can tell: the advisory lock held elsewhere."""
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute("SELECT pg_advisory_lock(%s, %s)", LOCK_KEY)
        yield connection
        connection.execute("SELECT pg_advisory_unlock(%s, %s)", LOCK_KEY)


def test_a_reconcile_that_finds_the_lock_held_does_nothing(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    reconcile_lock: psycopg.Connection[Any],
) -> None:
    chats = seed(api, auth, 1)
    (chat_id,) = chats
    converged(chat_id)
    drop_row(engine, chat_id, chats[chat_id][0]["id"])
    before_runs, before_rows = run_ids(engine), every_row(engine)

    repair, dry = run_cli("reconcile"), run_cli("reconcile", "--dry-run")
    assert repair.returncode == 0, repair.stdout + repair.stderr  # a no-op, not an error
    assert dry.returncode != 1, dry.stdout + dry.stderr  # it did not look: it found no drift
    for result in (repair, dry):
        assert "lock is held" in result.stdout
        assert "reconcile #" not in result.stdout
    assert reconcile(sessionmaker) is None
    assert run_ids(engine) == before_runs
    assert every_row(engine) == before_rows  # the drift is still there

    reconcile_lock.execute("SELECT pg_advisory_unlock(%s, %s)", LOCK_KEY)
    assert run_cli("reconcile").returncode == 0
    assert_converged(engine, [chat_id])


def _lock_state(connection: psycopg.Connection[Any]) -> tuple[int, int]:
    """(backends holding the reconcile lock, backends waiting for a per-chat sync lock)."""
    row = connection.execute(
        """
        SELECT count(*) FILTER (WHERE classid = %s AND objid = %s AND objsubid = 2 AND granted),
               count(*) FILTER (WHERE classid = %s AND NOT granted)
        FROM pg_locks WHERE locktype = 'advisory' AND database = (
            SELECT oid FROM pg_database WHERE datname = current_database())
        """,
        (LOCK_KEY[0], LOCK_KEY[1], SYNC_LOCK_CLASS),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_two_reconciles_started_together_one_runs_the_other_says_the_lock_is_held(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
    clean: None,
) -> None:
    chats = seed(api, auth, 12, size=3)
    ids = sorted(chats)
    converged(*ids)
    for chat_id in ids:
        drop_row(engine, chat_id, chats[chat_id][1]["id"])
    before = run_ids(engine)

    # Whichever process takes the reconcile lock first blocks on the sync lock of the first chat
    # of its first batch, held here; so the other one must find the reconcile lock taken.
    with psycopg.connect(DSN, autocommit=True) as watcher, psycopg.connect(DSN) as blocker:
        blocker.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (SYNC_LOCK_CLASS, ids[0]))
        slow = {"RECONCILE_LOCK_TIMEOUT_MS": "120000"}
        procs = [start_cli("reconcile", "--batch-size", "5", **slow) for _ in range(2)]
        try:
            loser = wait_until(
                lambda: next((p for p in procs if p.poll() is not None), None), timeout=60
            )
            assert _lock_state(watcher) == (1, 1), "the other run is not holding and waiting"
        finally:
            blocker.rollback()  # releases the chat lock: the winner goes on
        winner = procs[1] if loser is procs[0] else procs[0]
        lost_out, lost_err = loser.communicate(timeout=60)
        won_out, won_err = winner.communicate(timeout=120)

    assert loser.returncode == 0, lost_out + lost_err
    assert "lock is held" in lost_out and "reconcile #" not in lost_out
    assert winner.returncode == 0, won_out + won_err
    assert "lock is held" not in won_out
    assert summary(won_out)["inserted"] == "12"
    added = [i for i in run_ids(engine) if i not in before]
    assert added == [printed_run_id(won_out)]  # exactly one run, recorded once
    assert run_row(engine, added[0])["outcome"] == "ok"
    assert_converged(engine, ids)


def test_a_reconcile_racing_live_appends_leaves_no_old_row(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    chats = seed(api, auth, 6, size=2)
    ids = sorted(chats)
    converged(*ids)

    stop = threading.Event()
    reports: list[Any] = []
    errors: list[BaseException] = []

    def reconcile_until_stopped() -> None:
        try:
            while not stop.is_set():
                report = reconcile(sessionmaker, batch_size=1)  # a transaction per chat
                if report is not None:
                    reports.append(report)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=reconcile_until_stopped, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        rounds = 0
        while rounds < 8 or len(reports) < 3:
            assert time.monotonic() < deadline, f"{rounds} rounds, {len(reports)} reconciles"
            for chat_id in ids:
                sent = message("user", content=f"live {rounds}")
                url = f"/chats/{chat_id}/messages"
                response = api.post(url, json={"message": sent}, headers=auth())
                assert response.status_code == 201, response.text
            # and a snapshot that drops the oldest message of one chat (a soft-delete to race)
            victim = ids[rounds % len(ids)]
            current = api.get(f"/chats/{victim}", headers=auth()).json()["messages"]
            response = api.put(
                f"/chats/{victim}/messages", json={"messages": current[1:]}, headers=auth()
            )
            assert response.status_code == 200, response.text
            rounds += 1
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert not thread.is_alive()

    converged(*ids, timeout=60)
    check = run_cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "drift: 0 rows in 0 chats" in check.stdout
    with engine.connect() as connection:
        ahead = connection.execute(
            text(
                "SELECT count(*) FROM copilot_chat_messages m JOIN copilot_chats c "
                "ON c.id = m.chat_id WHERE m.source_version > c.messages_version"
            )
        ).scalar_one()
        differing = connection.execute(
            text(
                """
                SELECT count(*) FROM copilot_chat_messages m JOIN copilot_chats c
                    ON c.id = m.chat_id
                WHERE m.deleted_at IS NULL AND m.content IS DISTINCT FROM (
                    SELECT e FROM jsonb_array_elements(c.messages) e
                    WHERE e ->> 'id' = m.message_id LIMIT 1)
                """
            )
        ).scalar_one()
    assert (ahead, differing) == (0, 0)
    for report in reports:
        recorded = run_row(engine, report.run_id)
        assert recorded["outcome"] == "ok" and recorded["finished_at"] is not None
        assert recorded["drift"] == report.drift and recorded["chats_scanned"] == len(ids)


def test_a_bad_element_does_not_abort_the_reconcile_of_other_chats(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    """DESIGN 4.7: a bad element already in JSONB never aborts a batch. An element whose
    `streamId` is too long for the stream index is such an element (the API accepts it in a
    snapshot: extra fields are kept verbatim)."""
    chats = seed(api, auth, 1)
    (good,) = chats
    converged(good)
    drop_row(engine, good, chats[good][0]["id"])
    poisoned = message("user", streamId=secrets.token_urlsafe(6000))  # 8,000 random bytes
    with transaction(sessionmaker) as session:
        bad = chats_repo.create(
            session, user_id="alice", title=None, model="m", workflow_id=None, messages=[poisoned]
        ).id
    try:
        report = reconcile(sessionmaker)
        assert report is not None and report.outcome == "ok"
        assert_converged(engine, [good])
    finally:
        execute(engine, "DELETE FROM copilot_chats WHERE id = :c", c=bad)


def test_the_reconcile_task_runs_in_the_worker_and_is_recorded_as_beat(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
) -> None:
    from tasks import celery

    chats = seed(api, auth, 1)
    (chat_id,) = chats
    converged(chat_id)
    drop_row(engine, chat_id, chats[chat_id][2]["id"])
    before = max(run_ids(engine), default=0)

    celery.send_task("chats.reconcile", kwargs={"since_seconds": 3600})

    def finished() -> dict[str, Any] | None:
        ids = [i for i in run_ids(engine) if i > before]
        row = run_row(engine, ids[0]) if ids else None
        return row if row and row["finished_at"] else None

    recorded = wait_until(finished, timeout=60)
    assert (recorded["trigger"], recorded["outcome"], recorded["since"]) == (
        "beat",
        "ok",
        timedelta(hours=1),
    )
    assert recorded["inserted"] >= 1
    assert_converged(engine, [chat_id])


def test_the_beat_schedule_runs_the_reconcile_nightly_with_an_expiry() -> None:
    import celeryconfig

    nightly = celeryconfig.beat_schedule["reconcile-nightly"]
    schedule = nightly["schedule"]
    assert nightly["task"] == "chats.reconcile"
    assert (schedule.minute, schedule.hour) == ({0}, {3})  # 03:00 UTC by default
    assert celeryconfig.timezone == "UTC"
    assert 0 < nightly["options"]["expires"] <= 86400


BEAT_SEND = """
from tasks import celery
celery.tasks["chats.reconcile"].apply_async(queue={queue!r})
"""


def test_the_reconcile_task_is_not_cut_short_by_the_sync_time_limits(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
) -> None:
    """The reconcile task says it "runs as long as it needs": a nightly run over every chat takes
    far longer than a sync's limits. In a deployment whose task limits are 1 s (soft) and 3 s
    (hard), a reconcile sent as beat sends it and held up 5 s on a chat lock must finish."""
    chats = seed(api, auth, 1)
    (chat_id,) = chats
    converged(chat_id)
    drop_row(engine, chat_id, chats[chat_id][0]["id"])
    queue = f"reconcile-limits-{uuid.uuid4().hex[:8]}"
    log_path = LOG_DIR / f"{queue}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = cli_env(TASK_SOFT_TIME_LIMIT_SECONDS="1", TASK_TIME_LIMIT_SECONDS="3")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO",
             "-n", f"{queue}@%h", "-Q", queue, "-c", "1", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def read_log() -> str:
            return log_path.read_text(errors="replace")

        def ready() -> bool:
            assert proc.poll() is None, read_log()
            return " ready." in read_log()

        wait_until(ready, timeout=60, interval=0.1)
        before = max(run_ids(engine), default=0)
        with psycopg.connect(DSN) as blocker, psycopg.connect(DSN, autocommit=True) as watcher:
            blocker.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (SYNC_LOCK_CLASS, chat_id)
            )
            # Sent as beat sends a registered task (`apply_async`), from a process with the same
            # settings as the worker: the message carries the task's limits as beat sees them.
            beat = subprocess.run(
                [sys.executable, "-c", BEAT_SEND.format(queue=queue)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert beat.returncode == 0, beat.stderr
            started = time.monotonic()

            def settled() -> str | None:
                ids = [i for i in run_ids(engine) if i > before]
                if ids and run_row(engine, ids[0])["finished_at"] is not None:
                    return "finished while blocked"
                if "TimeLimitExceeded" in read_log():
                    return "time limit"
                if time.monotonic() - started > 5 and _lock_state(watcher)[1] >= 1:
                    return "still waiting after 5 s"
                return None

            wait_until(settled, timeout=60)
            blocker.rollback()

        def finished() -> dict[str, Any] | None:
            ids = [i for i in run_ids(engine) if i > before]
            row = run_row(engine, ids[0]) if ids else None
            if row and row["finished_at"]:
                return row
            if "Hard time limit" in read_log():
                return {"outcome": "killed by the hard time limit", "error": read_log()[-2000:]}
            return None

        recorded = wait_until(finished, timeout=60)
        assert recorded["outcome"] == "ok", recorded["error"]
        assert "TimeLimitExceeded" not in read_log()
        assert_converged(engine, [chat_id])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)


# ---------------------------------------------------------------------------------------------
# A reconcile that survives its worst batch: timeouts, killed runs, chats that kill workers.


@contextmanager
def chat_held(chat_id: str) -> Iterator[psycopg.Connection[Any]]:
    """A chat held as a long sync holds it (its sync lock) and as a handler holds it (`FOR
    UPDATE`), from another connection, until the block ends."""
    with psycopg.connect(DSN) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (SYNC_LOCK_CLASS, chat_id))
        holder.execute("SELECT id FROM copilot_chats WHERE id = %s FOR UPDATE", (chat_id,))
        try:
            yield holder
        finally:
            holder.rollback()


def open_letters(engine: Engine, chat_id: str) -> dict[str, str]:
    """The chat's open dead letters, {reason: error}."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT reason, error FROM dualwrite_dead_letters "
                "WHERE chat_id = :c AND resolved_at IS NULL"
            ),
            {"c": chat_id},
        ).all()
    return {row.reason: row.error for row in rows}


def drifted_chats(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged, count: int
) -> tuple[list[str], dict[str, str]]:
    """`count` converged chats, each then missing the row of its first message."""
    chats = seed(api, auth, count, size=2)
    ids = sorted(chats)
    converged(*ids)
    first = {chat_id: str(chats[chat_id][0]["id"]) for chat_id in ids}
    for chat_id in ids:
        drop_row(engine, chat_id, first[chat_id])
    return ids, first


def test_a_chat_held_past_the_lock_timeout_is_dead_lettered_and_the_run_goes_on(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    """One chat held by a sync for longer than the reconcile's lock timeout: its batch is split
    down to that chat, which gets a `reconcile_timeout` dead letter; every other chat, before and
    after it, is repaired. The limit is the reconcile's own: the worker's is two minutes."""
    ids, first = drifted_chats(api, auth, engine, converged, 7)
    held = ids[3]
    env = {"RECONCILE_LOCK_TIMEOUT_MS": "300", "WORKER_LOCK_TIMEOUT_MS": "120000"}
    with chat_held(held):
        result = run_cli("reconcile", "--batch-size", "4", timeout=60, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    done = summary(result.stdout)
    assert (done["chats"], done["inserted"], done["timed out"], done["skipped"]) == (
        "7",
        "6",
        "1",
        "0",
    )
    assert "1 chats timed out alone" in result.stdout
    assert_converged(engine, [c for c in ids if c != held])
    assert first[held] not in table_rows(engine, held)[0]  # not repaired: it was never reached

    letter = open_letters(engine, held)
    assert set(letter) == {"reconcile_timeout"}, letter
    assert "lock timeout" in letter["reconcile_timeout"]
    assert "300 ms" in letter["reconcile_timeout"]
    recorded = run_row(engine, printed_run_id(result.stdout))
    assert (recorded["outcome"], recorded["chats_scanned"], recorded["chats_timed_out"]) == (
        "incomplete",
        7,
        1,
    )
    assert (recorded["inserted"], recorded["error"]) == (6, None)
    assert recorded["finished_at"] is not None

    # Not blocking: the sweep still claims the chat once it is behind.
    execute(
        engine,
        "UPDATE copilot_chat_sync_state SET wanted_version = applied_version + 1, "
        "dirty_since = now() - interval '1 hour' WHERE chat_id = :c",
        c=held,
    )
    with transaction(sessionmaker) as session:
        claimed = [b.chat_id for b in sweep_claims(session)]
    assert uuid.UUID(held) in claimed

    # Once the sync is done, the next reconcile repairs the chat and closes the dead letter.
    again = reconcile(sessionmaker)
    assert again is not None
    assert (again.outcome, again.timed_out, again.inserted) == ("ok", 0, 1)
    assert_converged(engine, ids)
    assert open_letters(engine, held) == {}


def sweep_claims(session: Any) -> list[Any]:
    from app.services import sync

    return sync.sweep(session, grace=timedelta(0), ttl=timedelta(0), limit=1000)


def test_a_chat_past_the_statement_timeout_is_dead_lettered_and_the_run_goes_on(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    """A statement that outlasts the reconcile's statement timeout (here: one waiting on a held
    chat, with the lock timeout far longer) is cancelled with 57014; the batch is split, the chat
    alone is dead-lettered naming the statement timeout, and the run goes on."""
    ids, first = drifted_chats(api, auth, engine, converged, 5)
    held = ids[0]
    limits = Limits(statement_timeout_ms=400, lock_timeout_ms=120_000)
    started = time.monotonic()
    with chat_held(held):
        report = reconcile(sessionmaker, batch_size=5, limits=limits)
    assert time.monotonic() - started < 60  # not the lock timeout
    assert report is not None
    assert (report.outcome, report.chats, report.inserted, report.timed_out) == (
        "incomplete",
        5,
        4,
        1,
    )
    assert_converged(engine, ids[1:])
    assert first[held] not in table_rows(engine, held)[0]
    letter = open_letters(engine, held)["reconcile_timeout"]
    assert "statement timeout" in letter and "400 ms" in letter, letter
    assert run_row(engine, report.run_id)["chats_timed_out"] == 1

    # A dry run under the same limits does not wait on locks at all: it sees the drift.
    dry = reconcile(sessionmaker, dry_run=True, limits=limits)
    assert dry is not None and (dry.outcome, dry.inserted, dry.timed_out) == ("drift", 1, 0)


def test_a_reconcile_killed_mid_run_is_shown_and_recorded_as_killed(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    """SIGKILL a CLI reconcile while it waits on a chat: its run row says `running`, but nothing
    holds the reconcile lock any more; `status` shows it killed at once, and the next reconcile
    records it as killed, then does the work."""
    ids, _ = drifted_chats(api, auth, engine, converged, 2)
    before = run_ids(engine)
    with psycopg.connect(DSN, autocommit=True) as watcher, chat_held(ids[0]):
        proc = start_cli("reconcile", RECONCILE_LOCK_TIMEOUT_MS="120000")
        try:
            wait_until(lambda: _lock_state(watcher) == (1, 1), timeout=60)
        finally:
            proc.kill()
            proc.communicate(timeout=30)
        wait_until(lambda: _lock_state(watcher)[0] == 0, timeout=30)
        (killed,) = [i for i in run_ids(engine) if i not in before]
        assert run_row(engine, killed)["outcome"] == "running"

        shown = run_cli("status", timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        row = next(line for line in shown.stdout.splitlines() if line.startswith(f"{killed} "))
        assert re.split(r"\s{2,}", row)[5] == "killed", shown.stdout

    result = run_cli("reconcile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"marked killed: #{killed}" in result.stdout
    recorded = run_row(engine, killed)
    assert recorded["outcome"] == "killed" and recorded["finished_at"] is not None
    assert "unfinished" in recorded["error"]
    assert run_row(engine, printed_run_id(result.stdout))["outcome"] == "ok"
    assert_converged(engine, ids)


def test_a_run_that_raises_is_marked_failed_not_left_running(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    drifted_chats(api, auth, engine, converged, 2)

    def fail(report: Any) -> None:
        raise RuntimeError("progress sink broke")

    before = run_ids(engine)
    with pytest.raises(RuntimeError):
        reconcile(sessionmaker, batch_size=1, progress=fail)
    (failed,) = [i for i in run_ids(engine) if i not in before]
    recorded = run_row(engine, failed)
    assert recorded["outcome"] == "failed" and recorded["finished_at"] is not None
    assert "progress sink broke" in recorded["error"]
    assert recorded["chats_scanned"] == 1  # what it had done when it stopped


def test_a_chat_whose_sync_kills_workers_is_skipped_and_counted(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    ids, first = drifted_chats(api, auth, engine, converged, 3)
    lost = ids[1]
    with transaction(sessionmaker) as session:
        letter = dead_letters.record(
            session,
            task="chats.sync_chat",
            chat_id=uuid.UUID(lost),
            args=[lost, 1],
            reason=dead_letters.Reason.WORKER_LOST,
            error="worker lost 4 times",
            attempts=4,
        )
    try:
        dry = run_cli("reconcile", "--dry-run")
        assert dry.returncode == 1, dry.stdout + dry.stderr  # the drift of the other two
        assert (summary(dry.stdout)["missing"], summary(dry.stdout)["skipped"]) == ("2", "1")

        result = run_cli("reconcile")
        assert result.returncode == 0, result.stdout + result.stderr
        done = summary(result.stdout)
        assert (done["chats"], done["inserted"], done["skipped"], done["timed out"]) == (
            "3",
            "2",
            "1",
            "0",
        )
        assert "worker_lost" in result.stdout
        assert_converged(engine, [c for c in ids if c != lost])
        assert first[lost] not in table_rows(engine, lost)[0]  # left alone
        assert set(open_letters(engine, lost)) == {"worker_lost"}  # still waits for a replay
        recorded = run_row(engine, printed_run_id(result.stdout))
        assert (recorded["outcome"], recorded["chats_skipped"], recorded["inserted"]) == (
            "incomplete",
            1,
            2,
        )

        # With every chat checked except it, a dry run cannot say "no drift".
        clean_dry = run_cli("reconcile", "--dry-run")
        assert clean_dry.returncode == 3, clean_dry.stdout + clean_dry.stderr
    finally:
        with transaction(sessionmaker) as session:
            dead_letters.close(session, [letter])
