"""The cutover as an operator drives it: `python -m app phase`, `phase set NAME [--force]` and
`contract`, each run as its own process. Refusals exit non-zero, name the gate and change
nothing; the walk forward and back is recorded; the contract is irreversible, so it runs in a
database of its own."""

from __future__ import annotations

import getpass
import os
import pty
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from app.main import create_app
from app.repositories.reconcile_runs import LOCK_KEY
from app.settings import Phase, Settings
from tests.conftest import (
    RUN_ID,
    RedisServer,
    alembic,
    create_database,
    drop_database,
    start_worker,
)
from tests.support import (
    ROOT,
    AuthHeaders,
    WaitConverged,
    WorkerProcess,
    read_terminal,
    snapshot,
    wait_until,
)
from tests.test_handlers import message, new_chat
from tests.test_reconcile import change_content, printed_run_id, seed

PHASES = ", ".join(p.value for p in Phase)
# Who the CLI records: the same user on the same host as this test.
WHO = f"{getpass.getuser()}@{socket.gethostname()}"
NO_WAIT = {"PHASE_GATE_MIN_SECONDS": "0"}


def cli(*args: str, db: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m app ARGS` in its own process without a terminal, against the session's
    database or `db`."""
    extra = {"DATABASE_URL": db} if db is not None else {}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**os.environ, **extra, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def said(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class Rollout:
    """Everything a step or a contract could change."""

    row: tuple[Any, ...]  # dualwrite_phase
    changes: list[tuple[Any, ...]]  # dualwrite_phase_changes
    columns: list[str]  # of copilot_chats


def rollout(engine: Engine) -> Rollout:
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT phase, since, pending, pending_since, contracted_at FROM dualwrite_phase")
        ).one()
        changes = connection.execute(
            text(
                "SELECT id, at, who, from_phase, to_phase, forced, note "
                "FROM dualwrite_phase_changes ORDER BY id"
            )
        ).all()
        columns = connection.execute(
            text(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = 'copilot_chats' ORDER BY 1"
            )
        ).scalars()
        return Rollout(tuple(row), [tuple(c) for c in changes], list(columns))


def changes_after(engine: Engine, last_id: int) -> list[tuple[str, str, str, bool, str | None]]:
    """(who, from, to, forced, note) of each change recorded after `last_id`, oldest first."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT who, from_phase, to_phase, forced, note FROM dualwrite_phase_changes "
                "WHERE id > :id ORDER BY id"
            ),
            {"id": last_id},
        ).all()
    return [tuple(r) for r in rows]


def last_change_id(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT coalesce(max(id), 0) FROM dualwrite_phase_changes")
            ).scalar_one()
        )


def put(engine: Engine, phase: str, held: str = "1 day", pending: str | None = None) -> None:
    """The phase row as if `phase` had held for `held`, by hand."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE dualwrite_phase SET phase = :phase, "
                "since = now() - CAST(:held AS interval), pending = :pending, "
                "pending_since = CASE WHEN CAST(:pending AS text) IS NULL THEN NULL ELSE now() END"
            ),
            {"phase": phase, "held": held, "pending": pending},
        )


def refused(result: subprocess.CompletedProcess[str], gate: str) -> None:
    assert result.returncode == 1, said(result)
    assert f"refused: gate '{gate}' failed: " in result.stderr, said(result)
    assert result.stderr.rstrip().endswith("nothing changed"), said(result)
    assert "Traceback" not in said(result)


@pytest.fixture()
def phase_row(engine: Engine) -> Iterator[None]:
    """The session database's phase goes back to `dual_write`, nothing pending, afterwards."""
    yield
    put(engine, "dual_write")


@dataclass
class OwnDatabase:
    url: str
    engine: Engine

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, db=self.url, **env)


@pytest.fixture()
def own_db() -> Iterator[OwnDatabase]:
    """A database of this test's own at head, in `dual_write`, for what must not touch the
    session's (no reconcile ever run; a contract, which has no way back)."""
    name = f"cdw_cutover_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        alembic(url, "upgrade", "head")
        yield OwnDatabase(url, engine)
    finally:
        engine.dispose()
        drop_database(name)


# ---------------------------------------------------------------------------------------------
# What `phase` shows.


def test_phase_shows_the_phase_since_when_and_the_gates_of_the_next_step(
    own_db: OwnDatabase,
) -> None:
    with own_db.engine.begin() as connection:
        connection.execute(text("UPDATE dualwrite_phase SET since = '2026-01-02 03:04:05+00'"))

    result = own_db.cli("phase")

    assert result.returncode == 0, said(result)
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("since: 2026-01-02 03:04:05 UTC ("), lines
    assert "gates to verify_reads:" in lines
    assert "  [ok] one step: dual_write -> verify_reads" in lines
    held = next(line for line in lines if "phase held" in line)
    assert held.startswith("  [ok] phase held: dual_write held ")  # a long time ago
    assert "of the 3600s required (PHASE_GATE_MIN_SECONDS)" in held
    assert not any(line.startswith("pending:") for line in lines)
    assert "recent changes:" not in lines  # nobody changed it yet
    assert lines[-1] == "phase: dual_write"

    # The next gates are the next step's: verify_reads -> read_table needs a clean reconcile.
    put(own_db.engine, "verify_reads", held="10 minutes")
    lines = own_db.cli("phase").stdout.strip().splitlines()
    assert "gates to read_table:" in lines
    assert any(line.startswith("  [no] phase held: verify_reads held 6") for line in lines)
    assert "  [no] clean reconcile: no finished reconcile of every chat" in lines
    assert "  [ok] no shadow mismatch: 0 shadow-read mismatches since the last reconcile" in lines
    assert lines[-1] == "phase: verify_reads"


# ---------------------------------------------------------------------------------------------
# Refusals: each names its gate, exits 1, and changes nothing.


def test_a_step_that_skips_a_phase_is_refused_either_way(engine: Engine, phase_row: None) -> None:
    put(engine, "dual_write")
    before = rollout(engine)
    result = cli("phase", "set", "read_table", **NO_WAIT)
    refused(result, "one step")
    assert "dual_write -> read_table skips 1 phase(s)" in result.stderr
    assert rollout(engine) == before

    put(engine, "read_table")
    before = rollout(engine)
    result = cli("phase", "set", "dual_write", **NO_WAIT)
    refused(result, "one step")
    assert "read_table -> dual_write skips 1 phase(s)" in result.stderr
    assert rollout(engine) == before


def test_a_step_forward_before_the_phase_held_long_enough_is_refused(
    engine: Engine, phase_row: None
) -> None:
    put(engine, "dual_write", held="30 minutes")
    before = rollout(engine)

    result = cli("phase", "set", "verify_reads")  # the default: an hour

    refused(result, "phase held")
    assert re.search(
        r"dual_write held 18\d\ds of the 3600s required \(PHASE_GATE_MIN_SECONDS\)", result.stderr
    ), result.stderr
    assert rollout(engine) == before
    # Held longer than the setting asks, the same step goes.
    moved = cli("phase", "set", "verify_reads", PHASE_GATE_MIN_SECONDS="1200")
    assert moved.returncode == 0, said(moved)
    assert last_line(moved) == "phase: verify_reads"


def test_read_table_without_any_finished_reconcile_is_refused(own_db: OwnDatabase) -> None:
    put(own_db.engine, "verify_reads")
    before = rollout(own_db.engine)

    result = own_db.cli("phase", "set", "read_table", **NO_WAIT)

    refused(result, "clean reconcile")
    assert "gate 'clean reconcile' failed: no finished reconcile of every chat" in result.stderr
    assert "phase held" not in result.stderr and "one step" not in result.stderr
    assert rollout(own_db.engine) == before


def test_a_reconcile_of_a_window_does_not_open_the_read_table_gate(own_db: OwnDatabase) -> None:
    put(own_db.engine, "verify_reads")
    windowed = own_db.cli("reconcile", "--since", "1 hour")
    assert windowed.returncode == 0, said(windowed)
    before = rollout(own_db.engine)

    result = own_db.cli("phase", "set", "read_table", **NO_WAIT)

    refused(result, "clean reconcile")
    assert "no finished reconcile of every chat" in result.stderr
    assert rollout(own_db.engine) == before
    whole = own_db.cli("reconcile")
    assert whole.returncode == 0, said(whole)
    moved = own_db.cli("phase", "set", "read_table", **NO_WAIT)
    assert moved.returncode == 0, said(moved)


def test_read_table_after_a_dry_run_that_found_drift_is_refused_until_a_repair(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
    clean: None,
    phase_row: None,
) -> None:
    chats = seed(api, auth, 2)
    converged(*chats)
    first = cli("reconcile")
    assert first.returncode == 0, said(first)  # an earlier clean run does not count
    chat_id = sorted(chats)[0]
    change_content(engine, chat_id, chats[chat_id][1]["id"])
    dry = cli("reconcile", "--dry-run")
    assert dry.returncode == 1, said(dry)
    run_id = printed_run_id(dry.stdout)
    put(engine, "verify_reads")
    before = rollout(engine)

    result = cli("phase", "set", "read_table", **NO_WAIT)

    refused(result, "clean reconcile")
    assert f"last reconcile #{run_id}: drift, drift 1" in result.stderr
    assert rollout(engine) == before
    # A repair leaves no drift: that is a clean reconcile, and the gate opens.
    repair = cli("reconcile")
    assert repair.returncode == 0, said(repair)
    moved = cli("phase", "set", "read_table", **NO_WAIT)
    assert moved.returncode == 0, said(moved)
    assert last_line(moved) == "phase: read_table"


def test_read_table_with_a_shadow_mismatch_since_the_last_reconcile_is_refused(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
    clean: None,
    phase_row: None,
) -> None:
    chats = seed(api, auth, 1)
    converged(*chats)
    clean_run = cli("reconcile")
    assert clean_run.returncode == 0, said(clean_run)
    (chat_id,) = chats
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO dualwrite_shadow_mismatches (chat_id, detail) "
                "VALUES (:id, 'positions 0-3: JSONB and table differ')"
            ),
            {"id": chat_id},
        )
    put(engine, "verify_reads")
    before = rollout(engine)

    result = cli("phase", "set", "read_table", **NO_WAIT)

    refused(result, "no shadow mismatch")
    assert "1 shadow-read mismatches since the last reconcile" in result.stderr
    assert "clean reconcile" not in result.stderr
    assert rollout(engine) == before
    # A mismatch before the last clean reconcile no longer holds the step back.
    again = cli("reconcile")
    assert again.returncode == 0, said(again)
    moved = cli("phase", "set", "read_table", **NO_WAIT)
    assert moved.returncode == 0, said(moved)


def test_an_unknown_phase_name_exits_2_and_lists_the_phases(
    engine: Engine, phase_row: None
) -> None:
    before = rollout(engine)

    result = cli("phase", "set", "read-table", "--force")

    assert result.returncode == 2, said(result)
    assert "unknown phase 'read-table'" in result.stderr
    assert f"phases, in order: {PHASES}" in result.stderr
    assert "Traceback" not in said(result)
    assert rollout(engine) == before


# ---------------------------------------------------------------------------------------------
# The walk: forward with every gate satisfied, back one step, and a forced step.


def test_the_walk_to_table_only_and_one_step_back_is_recorded_and_loses_nothing(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
    clean: None,
    phase_row: None,
) -> None:
    chats = seed(api, auth, 2)
    converged(*chats)
    put(engine, "dual_write")
    start = last_change_id(engine)
    reconciled = cli("reconcile")
    assert reconciled.returncode == 0, said(reconciled)

    for step in ("verify_reads", "read_table", "table_only"):
        result = cli("phase", "set", step, **NO_WAIT)
        assert result.returncode == 0, said(result)
        assert " -> " + step in result.stdout and "forced" not in result.stdout, said(result)
        assert last_line(result) == f"phase: {step}"

    # In table_only the rows are the transcript: a reconcile of the JSONB has nothing to do.
    nothing = cli("reconcile")
    assert nothing.returncode == 0, said(nothing)
    assert nothing.stdout.startswith("nothing to reconcile: "), said(nothing)
    # A message written to the rows in table_only is in the JSONB once the step back is done.
    chat_id = sorted(chats)[0]
    late = message(content="written in table_only")
    response = api.post(f"/chats/{chat_id}/messages", json={"message": late}, headers=auth())
    assert response.status_code == 201, response.text

    back = cli("phase", "set", "read_table")  # back: no gate but one step
    assert back.returncode == 0, said(back)
    assert last_line(back) == "phase: read_table"
    jsonb = snapshot(engine, chat_id)["messages"]
    assert [m["id"] for m in jsonb] == [m["id"] for m in chats[chat_id]] + [late["id"]]
    assert api.get(f"/chats/{chat_id}", headers=auth()).json()["messages"] == jsonb

    assert changes_after(engine, start) == [
        (WHO, "dual_write", "verify_reads", False, None),
        (WHO, "verify_reads", "read_table", False, None),
        (WHO, "read_table", "table_only", False, None),
        (WHO, "table_only", "read_table", False, None),
    ]
    shown = cli("phase")
    assert "recent changes:" in shown.stdout
    assert last_line(shown) == "phase: read_table"
    with engine.connect() as connection:
        row = connection.execute(text("SELECT phase, pending FROM dualwrite_phase")).one()
    assert tuple(row) == ("read_table", None)


def test_a_forced_step_is_recorded_with_the_gates_it_skipped(
    engine: Engine, phase_row: None
) -> None:
    put(engine, "dual_write", held="0")
    start = last_change_id(engine)

    result = cli("phase", "set", "verify_reads", "--force")  # held 0s of the default hour

    assert result.returncode == 0, said(result)
    assert "moved dual_write -> verify_reads (forced past: phase held)" in result.stdout
    assert last_line(result) == "phase: verify_reads"
    ((who, was, now, forced, note),) = changes_after(engine, start)
    assert (who, was, now, forced) == (WHO, "dual_write", "verify_reads", True)
    assert note is not None and note.startswith("phase held: dual_write held ")
    assert "of the 3600s required (PHASE_GATE_MIN_SECONDS)" in note

    # A forced step whose gates all hold is not recorded as forced.
    put(engine, "dual_write")
    start = last_change_id(engine)
    result = cli("phase", "set", "verify_reads", "--force")
    assert result.returncode == 0, said(result)
    assert "forced" not in result.stdout
    assert changes_after(engine, start) == [(WHO, "dual_write", "verify_reads", False, None)]


# ---------------------------------------------------------------------------------------------
# An interrupted step: shown, undone by staying, finished by going.


def test_an_interrupted_step_is_shown_undone_and_finished(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
    clean: None,
    phase_row: None,
) -> None:
    chats = seed(api, auth, 1)
    converged(*chats)
    put(engine, "read_table")
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE dualwrite_phase SET pending = 'table_only', pending_since = now()")
        )
    start = last_change_id(engine)

    shown = cli("phase")
    assert shown.returncode == 0, said(shown)
    assert "pending: a step to table_only started at " in shown.stdout
    assert "`phase set table_only` finishes it, `phase set read_table` undoes it" in shown.stdout
    assert last_line(shown) == "phase: read_table"
    status = cli("status")
    assert "phase: read_table for 1d (a step to table_only is pending)" in status.stdout, said(
        status
    )

    before = rollout(engine)
    undone = cli("phase", "set", "read_table")
    assert undone.returncode == 0, said(undone)
    assert "already in read_table; no step pending" in undone.stdout
    after = rollout(engine)
    assert after.row[:2] == before.row[:2]  # same phase, same since
    assert after.row[2:4] == (None, None)  # nothing pending
    assert after.changes == before.changes  # staying is no change
    assert not cli("phase").stdout.count("pending:")

    with engine.begin() as connection:
        connection.execute(
            text("UPDATE dualwrite_phase SET pending = 'table_only', pending_since = now()")
        )
    finished = cli("phase", "set", "table_only", **NO_WAIT)
    assert finished.returncode == 0, said(finished)
    assert last_line(finished) == "phase: table_only"
    row = rollout(engine).row
    assert (row[0], row[2]) == ("table_only", None)
    assert changes_after(engine, start) == [(WHO, "read_table", "table_only", False, None)]
    back = cli("phase", "set", "read_table")
    assert back.returncode == 0, said(back)


# ---------------------------------------------------------------------------------------------
# The contract, in a database of its own: it has no way back.


@dataclass
class Contracting:
    db: OwnDatabase
    api: TestClient
    worker: WorkerProcess
    broker_url: str


@pytest.fixture()
def contracting(own_db: OwnDatabase, broker: RedisServer, hooks: Path) -> Iterator[Contracting]:
    """The own database with an API and a worker of its own, on the test's own broker."""
    worker = start_worker(broker, hooks, "cutover", DATABASE_URL=own_db.url)
    try:
        settings = Settings(database_url=own_db.url, redis_url=broker.url)
        with TestClient(create_app(settings)) as client:
            yield Contracting(own_db, client, worker, broker.url)
    finally:
        worker.stop()


def behind(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(*) FROM copilot_chat_sync_state "
                    "WHERE applied_version < wanted_version"
                )
            ).scalar_one()
        )


def rows_and_heads(engine: Engine) -> list[tuple[Any, ...]]:
    """Every row and every chat's sync state, for "nothing changed" assertions."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT chat_id, message_id, seq, content::text, deleted_at, updated_at, "
                "source_version FROM copilot_chat_messages ORDER BY chat_id, message_id"
            )
        ).all()
        heads = connection.execute(
            text(
                "SELECT chat_id, wanted_version, applied_version, next_seq, active_stream_id, "
                "synced_at FROM copilot_chat_sync_state ORDER BY chat_id"
            )
        ).all()
    return [tuple(r) for r in rows] + [tuple(h) for h in heads]


def contract_refused(
    db: OwnDatabase, result: subprocess.CompletedProcess[str], why: str, before: Rollout
) -> None:
    assert result.returncode == 1, said(result)
    assert why in result.stderr, said(result)
    assert result.stderr.rstrip().endswith("nothing dropped"), said(result)
    assert "Traceback" not in said(result)
    assert rollout(db.engine) == before
    assert "messages" in before.columns


def contract_on_a_terminal(db: OwnDatabase, answer: str) -> tuple[int, str]:
    """`contract` without --yes on a terminal, answering `answer` to its question."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "contract"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": db.url, "CONTRACT_MIN_TABLE_ONLY_SECONDS": "0"},
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    os.write(controller, answer.encode() + b"\n")
    shown = read_terminal(controller)
    return proc.wait(60), shown.decode(errors="replace")


def test_the_contract_is_gated_then_drops_the_jsonb_and_the_rows_serve_everything(
    contracting: Contracting,
    auth: AuthHeaders,
) -> None:
    db, api, worker = contracting.db, contracting.api, contracting.worker
    admin = auth("root", admin=True)
    # A transcript written in the JSONB era, converged by the worker.
    old_chat = new_chat(api, auth)
    old = [message(), message("assistant"), message()]
    response = api.put(f"/chats/{old_chat}/messages", json={"messages": old}, headers=auth())
    assert response.status_code == 200, response.text
    wait_until(lambda: behind(db.engine) == 0)

    # Outside table_only.
    before = rollout(db.engine)
    result = db.cli("contract", "--yes", CONTRACT_MIN_TABLE_ONLY_SECONDS="0")
    contract_refused(db, result, "the phase is dual_write; the contract needs table_only", before)

    assert db.cli("reconcile").returncode == 0
    for step in ("verify_reads", "read_table", "table_only"):
        moved = db.cli("phase", "set", step, **NO_WAIT)
        assert moved.returncode == 0, said(moved)
    # Written to the rows in table_only; the worker brings the JSONB up to them.
    response = api.post(f"/chats/{old_chat}/messages", json={"message": message()}, headers=auth())
    assert response.status_code == 201, response.text
    wait_until(lambda: behind(db.engine) == 0)

    # Without --yes and without a terminal: exit 2.
    before = rollout(db.engine)
    result = db.cli("contract", CONTRACT_MIN_TABLE_ONLY_SECONDS="0")
    assert result.returncode == 2, said(result)
    assert "pass --yes to confirm from a script" in result.stderr
    assert rollout(db.engine) == before
    # On a terminal, anything but yes.
    code, answer = contract_on_a_terminal(db, "n")
    assert code == 1, answer
    assert "There is no way back. [y/N]" in answer and "nothing done" in answer
    assert rollout(db.engine) == before
    # table_only has not held the default week.
    result = db.cli("contract", "--yes")
    contract_refused(db, result, "(CONTRACT_MIN_TABLE_ONLY_SECONDS)", before)
    assert "table_only has held " in result.stderr
    # A reconcile holds its lock.
    with psycopg.connect(db.url, autocommit=True) as holder:
        assert holder.execute("SELECT pg_try_advisory_lock(%s, %s)", LOCK_KEY).fetchone() == (True,)
        result = db.cli("contract", "--yes", CONTRACT_MIN_TABLE_ONLY_SECONDS="0")
        contract_refused(db, result, "a reconcile holds its lock", before)
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", LOCK_KEY)

    start = last_change_id(db.engine)
    result = db.cli("contract", "--yes", CONTRACT_MIN_TABLE_ONLY_SECONDS="0")

    assert result.returncode == 0, said(result)
    assert "contracted: copilot_chats.messages dropped; the migration is complete" in (
        result.stdout
    )
    after = rollout(db.engine)
    assert "messages" not in after.columns and "messages_version" not in after.columns
    assert after.row[0] == "table_only" and after.row[4] is not None
    with db.engine.connect() as connection:
        left = connection.execute(
            text(
                "SELECT to_regclass('dualwrite_backfill'), "
                "(SELECT count(*) FROM pg_trigger WHERE tgrelid = 'copilot_chats'::regclass "
                "AND NOT tgisinternal)"
            )
        ).one()
    assert tuple(left) == (None, 0)
    assert changes_after(db.engine, start) == [
        (WHO, "table_only", "table_only", False, "contract: JSONB column dropped")
    ]

    # What the operator sees, and what is refused from now on.
    status = db.cli("status", REDIS_URL=contracting.broker_url)
    assert status.returncode == 0, said(status)
    assert "migration: complete (contracted: the JSONB column is gone)" in status.stdout
    shown = db.cli("phase")
    assert "the migration is complete" in shown.stdout and "gates to" not in shown.stdout
    assert last_line(shown) == "phase: table_only"
    before = rollout(db.engine)
    for args in (("read_table",), ("read_table", "--force"), ("table_only",)):
        refused = db.cli("phase", "set", *args, **NO_WAIT)
        assert refused.returncode == 1, said(refused)
        assert "the JSONB column is gone: there is no way back" in refused.stderr, said(refused)
    again = db.cli("contract", "--yes", CONTRACT_MIN_TABLE_ONLY_SECONDS="0")
    assert again.returncode == 1, said(again)
    assert "already contracted at " in again.stderr
    nothing = db.cli("reconcile")
    assert nothing.returncode == 0 and nothing.stdout.startswith("nothing to reconcile: ")
    check = db.cli("check")
    assert check.returncode == 0 and "nothing to check" in check.stdout, said(check)
    assert rollout(db.engine) == before

    # Through the API, every operation works on the rows.
    transcript = api.get(f"/chats/{old_chat}", headers=auth())
    assert transcript.status_code == 200, transcript.text
    before_contract = transcript.json()["messages"]
    assert [m["id"] for m in before_contract][:3] == [m["id"] for m in old]
    question = message(content="after the contract")
    response = api.post(f"/chats/{old_chat}/messages", json={"message": question}, headers=auth())
    assert response.status_code == 201, response.text
    reply = message("assistant", content="answered")
    response = api.post(
        f"/chats/{old_chat}/turns/{question['id']}/complete",
        json={"message": reply},
        headers=auth(),
    )
    assert response.status_code == 201, response.text
    chat = api.get(f"/chats/{old_chat}", headers=auth()).json()
    ids = [m["id"] for m in before_contract] + [question["id"], reply["id"]]
    assert [m["id"] for m in chat["messages"]] == ids
    assert chat["active_stream_id"] is None  # the turn is complete
    page = api.get(f"/chats/{old_chat}/messages?limit=2", headers=auth()).json()
    assert page["source"] == "table"
    assert [m["id"] for m in page["messages"]] == ids[-2:]
    assert page["seqs"] == [len(ids) - 2, len(ids) - 1]
    earlier = api.get(
        f"/chats/{old_chat}/messages?limit=2&before_seq={page['next_before_seq']}",
        headers=auth(),
    ).json()
    assert [m["id"] for m in earlier["messages"]] == ids[-4:-2]

    response = api.post(
        f"/chats/{old_chat}/fork", json={"up_to_message_id": old[1]["id"]}, headers=auth()
    )
    assert response.status_code == 201, response.text
    fork = response.json()["id"]
    forked = api.get(f"/chats/{fork}", headers=auth()).json()["messages"]
    assert [m["id"] for m in forked] == [old[0]["id"], old[1]["id"]]

    snapshot_ = [old[2], message(content="replaced")]
    response = api.put(f"/chats/{fork}/messages", json={"messages": snapshot_}, headers=auth())
    assert response.status_code == 200, response.text
    replaced = api.get(f"/chats/{fork}", headers=auth()).json()["messages"]
    assert [m["id"] for m in replaced] == [m["id"] for m in snapshot_]

    imported = [message(), message("assistant")]
    response = api.post(
        "/admin/chats/import",
        json={"user_id": "alice", "title": "imported", "messages": imported},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    imported_id = response.json()["id"]
    got = api.get(f"/chats/{imported_id}", headers=auth()).json()["messages"]
    assert [m["id"] for m in got] == [m["id"] for m in imported]

    assert api.delete(f"/chats/{imported_id}", headers=auth()).status_code == 204
    assert api.get(f"/chats/{imported_id}", headers=auth()).status_code == 404
    with db.engine.connect() as connection:
        gone = connection.execute(
            text("SELECT count(*) FROM copilot_chat_messages WHERE chat_id = :id"),
            {"id": imported_id},
        ).scalar_one()
    assert gone == 0

    # Nothing follows the rows any more: no chat is "behind", and no lag alarm grows.
    status = db.cli("status", REDIS_URL=contracting.broker_url)
    assert "chats behind: 0" in status.stdout, said(status)
    assert "oldest behind: none" in status.stdout, said(status)
    scraped = api.get("/metrics").text
    assert "dualwrite_chats_behind 0.0" in scraped
    assert "dualwrite_oldest_behind_seconds 0.0" in scraped
    assert "dualwrite_reverse_backlog 0.0" in scraped
    assert 'dualwrite_phase{phase="contracted"} 1.0' in scraped

    # The worker: the syncs the handlers sent, and syncs and a sweep sent by hand, do nothing.
    from tasks.publish import producer

    sender = producer(Settings(redis_url=contracting.broker_url))
    unchanged = rows_and_heads(db.engine)
    sent = [
        sender.send_task("chats.sync_chat", args=[old_chat, 99]),
        sender.send_task("chats.sync_chat", args=[fork, 99]),
        sender.send_task("chats.sweep"),
    ]
    for task in sent:
        wait_until(lambda: f"[{task.id}] succeeded" in worker.log())  # noqa: B023
    log = worker.log()
    assert "ERROR" not in log and "Traceback" not in log, log
    assert rows_and_heads(db.engine) == unchanged
    assert rollout(db.engine) == before
