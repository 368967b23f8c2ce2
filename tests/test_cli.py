"""Operator commands (`python -m app ...`), each run as its own process against this run's
database, Redis and worker."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from datetime import timedelta
from typing import Any

import jwt
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app.auth import MAX_TTL_SECONDS
from app.db import transaction
from app.jobs import SYNC_CHAT
from app.repositories import chats as chats_repo
from app.repositories import dead_letters
from app.services import sync
from app.services.reconcile import reconcile
from harness.processes import WorkerProcess
from tests.support import (
    ROOT,
    AuthHeaders,
    SessionFactory,
    WaitConverged,
    assert_converged,
    read_terminal,
    wait_converged,
    wait_until,
)
from tests.test_handlers import message
from tests.test_reconcile import (
    change_content,
    cli_env,
    drifted_set,
    drop_row,
    printed_run_id,
    run_cli,
    run_ids,
    run_row,
    seed,
    start_cli,
    summary,
)

GARBAGE = [
    "1; drop table copilot_chats",
    "7 fortnights",
    "",
    "-1 days",
    "0 days",
    "7",
    "1 day 1 day",
]


def tables_exist(engine: Engine) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.execute(
                text(
                    "SELECT to_regclass('copilot_chats') IS NOT NULL "
                    "AND to_regclass('copilot_chat_messages') IS NOT NULL"
                )
            ).scalar_one()
        )


def test_since_rejects_garbage_with_a_clear_error_and_touches_nothing(engine: Engine) -> None:
    before = run_ids(engine)
    procs = {value: start_cli("reconcile", f"--since={value}") for value in GARBAGE}
    for value, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (value, out, err)
        assert err.startswith("error: --since: "), (value, err)
        assert f"invalid interval {value!r}" in err, (value, err)
        assert "Traceback" not in err and out == "", (value, out, err)
    assert tables_exist(engine)
    assert run_ids(engine) == before  # refused before any run started


def test_since_beyond_what_postgres_can_subtract_is_rejected_cleanly(engine: Engine) -> None:
    """A well-formed interval can still be unusable: `now() - 999999 weeks` is before 4713 BC."""
    before = run_ids(engine)
    result = run_cli("reconcile", "--dry-run", "--since=999999 weeks")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--since" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert run_ids(engine) == before
    assert tables_exist(engine)


def test_since_accepts_the_usual_forms(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged, clean: None
) -> None:
    chats = seed(api, auth, 1, size=2)
    converged(*chats)
    forms = {
        "7 days": timedelta(days=7),
        "12h": timedelta(hours=12),
        "1 day 6 hours": timedelta(days=1, hours=6),
        "30m": timedelta(minutes=30),
    }
    for value, interval in forms.items():
        result = run_cli("reconcile", "--dry-run", "--since", value)
        assert result.returncode == 0, (value, result.stdout, result.stderr)
        assert f"changed in the last {interval}" in result.stdout
        assert summary(result.stdout)["chats"] == "1"
        recorded = run_row(engine, printed_run_id(result.stdout))
        assert (recorded["since"], recorded["dry_run"], recorded["outcome"]) == (
            interval,
            True,
            "ok",
        )


def test_token_command_prints_tokens_the_api_accepts(
    api: TestClient, converged: WaitConverged
) -> None:
    admin_proc, plain_proc = start_cli("token", "alice", "--admin"), start_cli("token", "alice")
    admin_out, admin_err = admin_proc.communicate(timeout=60)
    plain_out, plain_err = plain_proc.communicate(timeout=60)
    assert admin_proc.returncode == 0 and plain_proc.returncode == 0, admin_err + plain_err
    admin = {"Authorization": f"Bearer {admin_out.strip()}"}
    plain = {"Authorization": f"Bearer {plain_out.strip()}"}
    transcript = [message("user"), message("assistant")]
    body = {"user_id": "carol", "title": "imported", "messages": transcript}

    imported = api.post("/admin/chats/import", json=body, headers=admin)
    assert imported.status_code == 201, imported.text
    assert api.post("/admin/chats/import", json=body, headers=plain).status_code == 403
    own = api.post("/chats", json={}, headers=plain)
    assert own.status_code == 201
    assert api.get(f"/chats/{own.json()['id']}", headers=admin).status_code == 200  # alice's
    converged(imported.json()["id"])


def test_check_prints_drift_per_chat_and_a_total(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    ids, expected = drifted_set(api, auth, engine, converged)
    result = run_cli("check")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for chat_id, (missing, stale, extra) in expected.items():
        line = next(line for line in lines if line.startswith(chat_id))
        assert line.endswith(f": {missing} missing, {stale} stale, {extra} extra"), line
    quiet = next(i for i in ids if i not in expected)
    assert not any(line.startswith(quiet) for line in lines)
    assert lines[-1] == "drift: 6 rows in 3 chats"

    assert reconcile(sessionmaker) is not None
    clean_check = run_cli("check")
    assert clean_check.returncode == 0, clean_check.stdout + clean_check.stderr
    assert clean_check.stdout.splitlines() == ["drift: 0 rows in 0 chats"]


def test_check_counts_only_what_differs(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged, clean: None
) -> None:
    chats = seed(api, auth, 2, size=3)
    first, second = sorted(chats)
    converged(first, second)
    drop_row(engine, first, chats[first][0]["id"])
    change_content(engine, second, chats[second][2]["id"])
    result = run_cli("check", "--batch-size", "1")
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "drift: 2 rows in 2 chats"


def _behind_chat_with_dead_letter(sessionmaker: SessionFactory) -> tuple[Any, int]:
    """A chat whose copy never happened (no task ran) and the dead letter its sync left."""
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session,
            user_id="alice",
            title=None,
            model="m",
            workflow_id=None,
            messages=[message("user"), message("assistant")],
        )
        letter = dead_letters.record(
            session,
            task=SYNC_CHAT,
            chat_id=chat.id,
            args=[str(chat.id), chat.messages_version],
            reason=dead_letters.Reason.FAILED,
            error="OperationalError: server closed the connection unexpectedly",
            attempts=9,
        )
    return chat.id, letter


def _letter(engine: Engine, letter_id: int) -> dict[str, Any]:
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text("SELECT * FROM dualwrite_dead_letters WHERE id = :id"), {"id": letter_id}
            )
            .mappings()
            .one()
        )


def test_dead_letters_list_and_replay_resync_the_chat_and_resolve_it(
    engine: Engine,
    sessionmaker: SessionFactory,
    worker: WorkerProcess,
) -> None:
    chat_id, letter = _behind_chat_with_dead_letter(sessionmaker)

    listing = run_cli("dead-letters", "list", "--limit", "100000")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if re.match(rf"{letter}\s", line))
    assert str(chat_id) in row and " failed " in row and " open " in row
    assert "OperationalError: server closed" in row

    replayed = run_cli("dead-letters", "replay", str(letter))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"{letter}  chat {chat_id}: enqueued" in replayed.stdout
    assert "1 replayed" in replayed.stdout

    wait_until(lambda: _letter(engine, letter)["resolved_at"] is not None, timeout=30)
    wait_converged(engine, [chat_id])
    assert _letter(engine, letter)["replayed_at"] is not None

    after = run_cli("dead-letters", "list", "--limit", "100000")
    assert not any(re.match(rf"{letter}\s", line) for line in after.stdout.splitlines())
    everything = run_cli("dead-letters", "list", "--all", "--limit", "100000")
    row = next(line for line in everything.stdout.splitlines() if re.match(rf"{letter}\s", line))
    assert " resolved " in row


def test_replaying_a_dead_letter_whose_chat_was_deleted_closes_it(
    engine: Engine, sessionmaker: SessionFactory
) -> None:
    chat_id, letter = _behind_chat_with_dead_letter(sessionmaker)
    with transaction(sessionmaker) as session:
        assert chats_repo.delete(session, chat_id, "alice")

    replayed = run_cli("dead-letters", "replay", str(letter))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"{letter}  chat {chat_id}: closed: chat deleted" in replayed.stdout
    assert _letter(engine, letter)["resolved_at"] is not None


def test_replaying_bad_elements_converges_the_chat_and_reports_what_is_still_skipped(
    engine: Engine,
    sessionmaker: SessionFactory,
) -> None:
    good = [message("user"), message("assistant")]
    poison: list[Any] = [
        "a bare string",
        {"id": "x" * 2000, "role": "user", "content": "id too long"},
    ]
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session,
            user_id="alice",
            title=None,
            model="m",
            workflow_id=None,
            messages=[good[0], *poison, good[1]],
        )
        sync.sync_chats(session, {chat.id: chat.messages_version})  # what the worker did
    (letter,) = [d for d in _open_letters(engine, chat.id) if d["reason"] == "bad_elements"]

    again = run_cli("dead-letters", "replay", str(letter["id"]))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        f"{letter['id']}  chat {chat.id}: converged: 2 of 4 elements still skipped; stays open"
        in again.stdout
    )
    still = _letter(engine, letter["id"])
    assert still["resolved_at"] is None and still["replayed_at"] is not None
    assert still["attempts"] == 2 and still["error"].startswith("2 of 4 elements skipped")

    # The data is fixed (a snapshot without the bad elements); the next replay closes it.
    with transaction(sessionmaker) as session:
        chats_repo.replace_messages(session, chat.id, "alice", good)
    fixed = run_cli("dead-letters", "replay", str(letter["id"]))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert (
        f"{letter['id']}  chat {chat.id}: converged: no element skipped any more; resolved"
        in fixed.stdout
    )
    assert _letter(engine, letter["id"])["resolved_at"] is not None
    assert_converged(engine, [chat.id])

    nothing = run_cli("dead-letters", "replay", str(letter["id"]))
    assert nothing.returncode == 0, nothing.stdout + nothing.stderr
    assert nothing.stdout.splitlines() == [
        f"{letter['id']}: no open dead letter with this id",
        "nothing to replay",
    ]


def _open_letters(engine: Engine, chat_id: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [
            dict(row)
            for row in connection.execute(
                text(
                    "SELECT * FROM dualwrite_dead_letters "
                    "WHERE chat_id = :id AND resolved_at IS NULL"
                ),
                {"id": chat_id},
            ).mappings()
        ]


def test_replay_without_ids_is_refused(engine: Engine) -> None:
    result = run_cli("dead-letters", "replay")
    assert result.returncode == 2
    assert "needs dead letter ids or --all" in result.stderr


def test_status_shows_queues_workers_backlog_dead_letters_and_reconciles(
    engine: Engine,
    sessionmaker: SessionFactory,
    worker: WorkerProcess,
    clean: None,
) -> None:
    _, letter = _behind_chat_with_dead_letter(sessionmaker)
    try:
        report = reconcile(sessionmaker, dry_run=True)  # a dry run leaves the chat behind
        assert report is not None
        with transaction(sessionmaker) as session:
            open_letters = dead_letters.count_open(session)

        result = run_cli("status")
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert re.search(
            r"^queues: dualwrite\.sync \d+ waiting, dualwrite\.maintenance \d+ waiting; "
            r"\d+ delivered, not acked$",
            out,
            re.MULTILINE,
        ), out
        workers = re.search(r"^workers seen: (\d+) \((.*)\)$", out, re.MULTILINE)
        assert workers, out
        assert int(workers.group(1)) >= 1
        assert any(name.startswith(f"{worker.name}@") for name in workers.group(2).split(", "))
        assert "chats behind: 1\n" in out
        # Its only behind chat waits for an operator (its dead letter), not for a worker.
        assert "oldest behind: none (not counting dead-lettered chats)\n" in out
        expected = f"dead letters open: {sum(open_letters.values())} ("
        assert expected in out and f"failed {open_letters['failed']}" in out, out
        assert "recent reconciles:" in out
        # The chat is behind, but its sync failed and the sweep skips it: no sync is on its way,
        # so its two missing rows are drift, not lag.
        assert re.search(rf"^{report.run_id}\s.*\sTrue\s+drift\s+1\s+2\s+0\s", out, re.MULTILINE), (
            out
        )
    finally:
        with transaction(sessionmaker) as session:
            dead_letters.close(session, [letter])


def test_reconcile_on_a_terminal_draws_a_progress_bar(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged, clean: None
) -> None:
    chats = seed(api, auth, 3, size=2)
    converged(*chats)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "reconcile", "--dry-run", "--batch-size", "1"],
        cwd=ROOT,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    drawn = read_terminal(controller)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + drawn.decode(errors="replace")
    screen = drawn.decode(errors="replace")
    assert "1/3 chats" in screen and "2/3 chats" in screen
    assert f"[{'#' * 30}] 3/3 chats, 6 messages" in screen
    assert summary(out)["chats"] == "3"
    assert_converged(engine, chats)


def test_batch_size_must_be_positive(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged, clean: None
) -> None:
    """A batch of 0 chats scans nothing: a dry run or a check would report no drift at all."""
    chats = seed(api, auth, 1, size=2)
    (chat_id,) = chats
    converged(chat_id)
    drop_row(engine, chat_id, chats[chat_id][0]["id"])
    procs = {
        (command, size): start_cli(*command.split(), "--batch-size", size)
        for command in ("reconcile --dry-run", "check")
        for size in ("0", "-5")
    }
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (key, proc.returncode, out, err)
        assert "--batch-size" in err and "Traceback" not in err, (key, err)


def test_token_lifetime_is_capped() -> None:
    too_long = run_cli("token", "alice", "--ttl", str(MAX_TTL_SECONDS + 1))
    assert too_long.returncode == 2 and not too_long.stdout
    assert "longer than the longest token lifetime, 2592000 seconds (30 days)" in too_long.stderr
    longest = run_cli("token", "alice", "--ttl", str(MAX_TTL_SECONDS))
    assert longest.returncode == 0, longest.stderr
    claims = jwt.decode(longest.stdout.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == MAX_TTL_SECONDS
