"""The rollout page, `/ops/`, through the API's real app against this run's database, Redis and
worker: who may see it, CSRF on its actions, replay through the page, pause of the scheduled
reconciles. (`test_ops_browser.py` drives it in a real browser.)"""

from __future__ import annotations

import base64
import html
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, text

from app.broker import producer
from app.db import transaction
from app.ops.auth import CSRF_MAX_AGE_SECONDS, csrf_token
from app.repositories import dead_letters
from app.settings import Settings
from app.task_names import RECONCILE
from harness.processes import WorkerProcess
from tests.support import SessionFactory, SetPhase, wait_converged, wait_until
from tests.test_cli import _behind_chat_with_dead_letter, _letter
from tests.test_reconcile import run_cli

PASSWORD = "pw-" + secrets.token_hex(8)
OPS = ("ops", PASSWORD)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AUTH = basic(*OPS)


@pytest.fixture(scope="module")
def ops_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"ops_basic_auth": SecretStr(":".join(OPS))})


@pytest.fixture(scope="module")
def ops(ops_settings: Settings) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app(ops_settings)) as client:
        yield client


@pytest.fixture()
def no_open_letters(engine: Engine) -> None:
    """The page lists every open dead letter: close those other tests left open."""
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE dualwrite_dead_letters SET resolved_at = now() WHERE resolved_at IS NULL")
        )


@pytest.fixture()
def resumed(engine: Engine) -> Iterator[None]:
    """Every bulk pass runs again after the test."""
    yield
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM dualwrite_bulk_paused"))


def token_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return html.unescape(found.group(1))


def test_the_page_does_not_exist_without_ops_basic_auth(api: TestClient) -> None:
    for method, path in [
        ("GET", "/ops/"),
        ("GET", "/ops/replay?all=1"),
        ("POST", "/ops/replay"),
        ("POST", "/ops/bulk/pause"),
    ]:
        response = api.request(method, path, headers=AUTH)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"detail": "Not Found"}


def test_wrong_or_missing_credentials_get_401_with_a_basic_challenge(ops: TestClient) -> None:
    wrong = [
        {},
        basic("ops", "not-the-password"),
        basic("someone", PASSWORD),
        basic("ops", PASSWORD + "x"),
        {"Authorization": "Basic !!not base64!!"},
        {"Authorization": "Bearer " + PASSWORD},
        {"Authorization": "Basic " + base64.b64encode(b"ops").decode()},
    ]
    for headers in wrong:
        for method, path in [("GET", "/ops/"), ("POST", "/ops/replay"), ("GET", "/ops/bulk/pause")]:
            response = ops.request(method, path, headers=headers)
            assert response.status_code == 401, (headers, path, response.text)
            assert response.headers["www-authenticate"].startswith('Basic realm="')
            assert PASSWORD not in response.text
    assert ops.get("/ops/", headers=AUTH).status_code == 200


def test_ops_basic_auth_must_be_user_and_password() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    for bad in ("nocolon", ":pw", "user:", "user:changeme"):
        with pytest.raises(ValidationError, match="OPS_BASIC_AUTH"):
            Settings(ops_basic_auth=bad)
    assert Settings(ops_basic_auth="").ops_basic_auth is None


def test_the_page_shows_phase_gates_backlog_dead_letters_and_refreshes(
    ops: TestClient,
    sessionmaker: SessionFactory,
    clean: None,
    no_open_letters: None,
) -> None:
    chat_id, letter = _behind_chat_with_dead_letter(sessionmaker)
    response = ops.get("/ops/", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "<script" not in page
    assert re.search(r'id="phase">phase: dual_write for \d+[smhd]<', page), page
    # The next step's gates, as `phase` prints them, and the command to run.
    assert "gates to verify_reads (next step)" in page
    assert re.search(r"\[(ok|no)\]</span> phase held: dual_write held \d+s of the", page)
    assert "python -m app phase set verify_reads" in page
    # A step back has only the "one step" gate.
    assert "gates to jsonb_only (a step back)" in page
    assert "one step: dual_write -&gt; jsonb_only" in page
    assert "python -m app phase set jsonb_only" in page
    assert 'id="chats-behind">chats behind: 1<' in page
    assert "oldest behind: none" in page  # its only chat behind waits for an operator
    assert "backfill: " in page
    assert "dead letters open: 1 (failed 1)" in page
    row = re.search(rf'<tr id="letter-{letter}">(.*?)</tr>', page, re.DOTALL)
    assert row, page
    assert str(chat_id) in row.group(1) and ">failed<" in row.group(1)
    assert '<td class="state">open</td>' in row.group(1)
    assert f'id="replay-{letter}"' in row.group(1)
    for counter in ("dualwrite_publish_dropped_total", "dualwrite_enqueue_failures_total"):
        assert counter in page
    assert 'id="lag"' in page or "worker metrics are unreachable" in page
    assert "reconcile-nightly" in page and "reconcile-recent" in page
    assert "recent reconciles" in page


def test_the_lag_histogram_shows_each_bucket_of_the_worker_metrics(ops: TestClient) -> None:
    from app.ops.service import lag

    shown = lag({b"lag_bucket|0.05": b"3", b"lag_bucket|+Inf": b"1", b"lag_count": b"4",
                 b"lag_sum": b"4000.2", b"lag_bucket|1": b"nan"})  # fmt: skip
    counts = {b.le: b.count for b in shown.buckets}
    assert counts["0.05"] == 3 and counts["+Inf"] == 1 and counts["1"] == 0
    assert shown.count == 4 and shown.mean_seconds == pytest.approx(1000.05)
    assert max(b.percent for b in shown.buckets) == 100.0


def _replay_confirmation(ops: TestClient, letter: int) -> str:
    confirm = ops.get(f"/ops/replay?id={letter}", headers=AUTH)
    assert confirm.status_code == 200, confirm.text
    assert "http-equiv" not in confirm.text  # no refresh while a confirmation is shown
    assert f"python -m app dead-letters replay {letter}" in confirm.text
    return token_of(confirm.text)


def test_replay_through_the_page_enqueues_and_the_worker_resolves_it(
    ops: TestClient,
    engine: Engine,
    sessionmaker: SessionFactory,
    worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chat_id, letter = _behind_chat_with_dead_letter(sessionmaker)
    token = _replay_confirmation(ops, letter)
    assert _letter(engine, letter)["replayed_at"] is None  # a confirmation changes nothing

    with caplog.at_level("INFO", logger="app.ops.service"):
        done = ops.post("/ops/replay", data={"csrf_token": token, "id": str(letter)}, headers=AUTH)
    assert done.status_code == 200, done.text
    assert f"{letter}  chat {chat_id}: enqueued" in done.text
    assert "1 replayed" in done.text
    # Logged as the CLI prints it, with who asked: the basic-auth user.
    assert any(
        "dead-letters replay by ops@" in r.getMessage()
        and f"{letter}  chat {chat_id}: enqueued" in r.getMessage()
        for r in caplog.records
    ), caplog.text

    wait_until(lambda: _letter(engine, letter)["resolved_at"] is not None, timeout=30)
    wait_converged(engine, [chat_id])
    assert _letter(engine, letter)["replayed_at"] is not None
    page = ops.get("/ops/", headers=AUTH).text
    assert f'id="letter-{letter}"' not in page


def test_replay_all_through_the_page(
    ops: TestClient,
    engine: Engine,
    sessionmaker: SessionFactory,
    worker: WorkerProcess,
    no_open_letters: None,
) -> None:
    letters = [_behind_chat_with_dead_letter(sessionmaker) for _ in range(2)]
    confirm = ops.get("/ops/replay?all=1", headers=AUTH)
    assert "python -m app dead-letters replay --all" in confirm.text
    form = {"csrf_token": token_of(confirm.text), "all": "1"}
    # A letter opened after the confirmation was shown is not what the operator agreed to.
    late_chat, late = _behind_chat_with_dead_letter(sessionmaker)
    try:
        missing = ops.post("/ops/replay", data=form, headers=AUTH)  # no bound: refused
        assert missing.status_code == 422 and "through" in missing.text, missing.text
        done = ops.post("/ops/replay", data={**form, **hidden(confirm.text)}, headers=AUTH)
        assert done.status_code == 200, done.text
        assert "2 replayed" in done.text
        for chat_id, letter in letters:
            assert f"{letter}  chat {chat_id}: enqueued" in done.text
        assert str(late_chat) not in done.text
        assert _letter(engine, late)["replayed_at"] is None
        wait_until(lambda: all(_letter(engine, n)["resolved_at"] for _, n in letters), timeout=30)
    finally:
        with transaction(sessionmaker) as session:
            dead_letters.close(session, [late])


def hidden(page: str) -> dict[str, str]:
    """The hidden fields of a confirmation's form, but its CSRF token and the action's."""
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page))
    return {k: v for k, v in fields.items() if k not in ("csrf_token", "all", "id")}


def test_an_action_without_a_valid_csrf_token_is_refused_and_changes_nothing(
    ops: TestClient,
    ops_settings: Settings,
    engine: Engine,
    sessionmaker: SessionFactory,
    resumed: None,
) -> None:
    _, letter = _behind_chat_with_dead_letter(sessionmaker)
    good = _replay_confirmation(ops, letter)
    issued, _, mac = good.partition(".")
    forged = [
        None,  # no token at all
        "",
        "garbage",
        f"{issued}.{'0' * len(mac)}",  # a wrong MAC
        f"{int(issued) + 1}.{mac}",  # the MAC of another time
        csrf_token(ops_settings, "mallory", "/ops/replay"),  # issued to another user
        csrf_token(  # expired
            ops_settings, "ops", "/ops/replay", now=time.time() - CSRF_MAX_AGE_SECONDS - 5
        ),
    ]
    try:
        for token in forged:
            data = {"id": str(letter)} | ({"csrf_token": token} if token is not None else {})
            refused = ops.post("/ops/replay", data=data, headers=AUTH)
            assert refused.status_code == 403, (token, refused.text)
            assert "csrf_token" in refused.text and "Nothing was changed" in refused.text
            paused = ops.post("/ops/bulk/pause", data=data, headers=AUTH)
            assert paused.status_code == 403, (token, paused.text)
        # A good token is good for its own action only.
        elsewhere = ops.post("/ops/bulk/pause", data={"csrf_token": good}, headers=AUTH)
        assert elsewhere.status_code == 403, elsewhere.text
        # A good token from a page of another site (a cross-site form) is refused too.
        for header, value in [
            ("Origin", "https://evil.example"),
            ("Referer", "https://e.x/"),
            ("Origin", "https://testserver"),  # the same host, another scheme
            ("Referer", "ftp://testserver/ops/"),
            ("Origin", "null"),
        ]:
            refused = ops.post(
                "/ops/replay",
                data={"id": str(letter), "csrf_token": good},
                headers={**AUTH, header: value},
            )
            assert refused.status_code == 403, refused.text
            assert header.lower() in refused.text
        assert _letter(engine, letter)["replayed_at"] is None
        with engine.connect() as connection:
            assert (
                connection.execute(text("SELECT count(*) FROM dualwrite_bulk_paused")).scalar() == 0
            )

        # The same token from the page's own origin goes through.
        done = ops.post(
            "/ops/replay",
            data={"id": str(letter), "csrf_token": good},
            headers={**AUTH, "Origin": "http://testserver"},
        )
        assert done.status_code == 200, done.text
        assert _letter(engine, letter)["replayed_at"] is not None
    finally:
        with transaction(sessionmaker) as session:
            dead_letters.close(session, [letter])


def test_bad_input_gets_a_4xx_naming_the_field(ops: TestClient, ops_settings: Settings) -> None:
    def token(path: str) -> str:  # what the confirmation of that action hands out
        return csrf_token(ops_settings, "ops", path)

    cases: list[tuple[str, str, dict[str, Any] | None, int, str]] = [
        ("GET", "/ops/replay", None, 422, "id"),
        ("GET", "/ops/replay?id=abc", None, 422, "id"),
        ("POST", "/ops/replay", {"csrf_token": token("/ops/replay"), "id": "abc"}, 422, "id"),
        ("POST", "/ops/replay", {"csrf_token": token("/ops/replay")}, 422, "id"),
        ("GET", "/ops/bulk/pause?pass=sweep", None, 422, "pass"),
        (
            "POST",
            "/ops/bulk/pause",
            {"csrf_token": token("/ops/bulk/pause"), "pass": "nope"},
            422,
            "pass",
        ),
        ("GET", "/ops/bulk/explode", None, 422, "action"),
        ("POST", "/ops/bulk/explode", {"csrf_token": token("/ops/bulk/explode")}, 422, "action"),
    ]
    for method, path, data, status, field in cases:
        response = ops.request(method, path, data=data, headers=AUTH)
        assert response.status_code == status, (path, data, response.text)
        assert field in response.text, (path, response.text)
    huge = ops.post("/ops/replay", content=b"id=1&" * 20_000, headers=AUTH)
    assert huge.status_code == 413


def _pause_through_the_page(ops: TestClient, name: str) -> str:
    confirm = ops.get(f"/ops/bulk/pause?pass={name}", headers=AUTH)
    assert confirm.status_code == 200, confirm.text
    assert f"python -m app bulk pause {name}" in confirm.text
    done = ops.post(
        "/ops/bulk/pause", data={"csrf_token": token_of(confirm.text), "pass": name}, headers=AUTH
    )
    assert done.status_code == 200, done.text
    text: str = done.text
    return text


def _runs(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(text("SELECT count(*) FROM dualwrite_reconcile_runs")).scalar_one()
        )


def test_a_paused_reconcile_skips_its_scheduled_runs_until_resumed(
    ops: TestClient,
    engine: Engine,
    settings: Settings,
    worker: WorkerProcess,
    clean: None,
    resumed: None,
) -> None:
    assert "reconcile-nightly: paused" in _pause_through_the_page(ops, "reconcile-nightly")
    page = ops.get("/ops/", headers=AUTH).text
    row = re.search(r'<tr id="pass-reconcile-nightly">(.*?)</tr>', page, re.DOTALL)
    assert row and "paused</span> by ops@testclient (ops page)" in row.group(1), page
    assert 'id="resume-reconcile-nightly"' in row.group(1)
    status = run_cli("status")
    assert "reconcile-nightly paused by ops@testclient (ops page) since " in status.stdout
    assert "reconcile-recent running" in status.stdout

    # What beat sends: the nightly run (every chat), and the recent one (a window).
    sender = producer(settings)
    before = _runs(engine)
    offset = len(worker.log())
    sender.send_task(RECONCILE)
    wait_until(
        lambda: (
            "reconcile: skipped: reconcile-nightly is paused (by ops@testclient"
            in worker.log()[offset:]
        ),
        timeout=30,
        what="the worker to log the skipped run",
    )
    assert _runs(engine) == before  # no run started
    # The other pass is not paused and runs.
    sender.send_task(RECONCILE, kwargs={"since_seconds": 3600})
    wait_until(lambda: _runs(engine) == before + 1, timeout=30)

    confirm = ops.get("/ops/bulk/resume?pass=reconcile-nightly", headers=AUTH)
    resumed_page = ops.post(
        "/ops/bulk/resume",
        data={"csrf_token": token_of(confirm.text), "pass": "reconcile-nightly"},
        headers=AUTH,
    )
    assert "reconcile-nightly: resumed" in resumed_page.text
    sender.send_task(RECONCILE)
    wait_until(lambda: _runs(engine) == before + 2, timeout=30)


def test_bulk_pause_and_resume_from_the_cli(engine: Engine, resumed: None) -> None:
    paused = run_cli("bulk", "pause")
    assert paused.returncode == 0, paused.stderr
    assert "reconcile-nightly: paused" in paused.stdout
    assert "reconcile-recent: paused" in paused.stdout
    again = run_cli("bulk", "pause", "reconcile-recent")
    assert "reconcile-recent: was paused already" in again.stdout
    shown = run_cli("bulk")
    assert shown.stdout.startswith("bulk passes: reconcile-nightly paused by ")
    back = run_cli("bulk", "resume", "reconcile-recent")
    assert "reconcile-recent: resumed" in back.stdout
    assert "reconcile-recent running" in back.stdout
    assert "reconcile-nightly paused by" in back.stdout
    unknown = run_cli("bulk", "pause", "sweep")
    assert unknown.returncode == 2 and "passes:" in unknown.stderr


def test_the_templates_ship_with_the_package() -> None:
    """`pip install .` (the image's) installs only what `package-data` names."""
    import fnmatch
    import tomllib

    from tests.support import ROOT

    package = ROOT / "app" / "ops"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["app.ops"]
    templates = [p.relative_to(package).as_posix() for p in (package / "templates").iterdir()]
    assert templates
    for template in templates:
        assert any(fnmatch.fnmatch(template, glob) for glob in globs), template


def test_in_table_only_the_page_shows_the_reverse_backlog_and_the_contract_to_come(
    ops: TestClient,
    set_phase: SetPhase,
) -> None:
    set_phase("table_only")
    page = ops.get("/ops/", headers=AUTH).text
    assert re.search(r'id="phase">phase: table_only for 1d<', page), page
    assert "reverse sync backlog: " in page
    assert "python -m app contract" in page  # the next step is the contract, run from the CLI
    assert "gates to read_table (a step back)" in page
    assert "python -m app phase set read_table" in page
    assert "gates to " not in page.replace("gates to read_table", "")


def test_a_confirmation_of_every_replay_lists_a_bounded_few_and_counts_them_all(
    ops: TestClient,
    engine: Engine,
    no_open_letters: None,
) -> None:
    """After an incident there may be tens of thousands of open dead letters: the confirmation
    of `all` lists the first ones and says how many it would replay."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO dualwrite_dead_letters (task, chat_id, args, reason, error, attempts) "
                "SELECT 'chats.sync_chat', gen_random_uuid(), '[]', 'failed', repeat('x', 2000), 1 "
                "FROM generate_series(1, 150)"
            )
        )
    try:
        page = ops.get("/ops/replay?all=1", headers=AUTH)
        assert page.status_code == 200, page.text
        assert "(150)?" in page.text
        assert "The first 100 of 150 are listed." in page.text
        assert page.text.count("chats.sync_chat") == 100
    finally:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE dualwrite_dead_letters SET resolved_at = now() "
                    "WHERE resolved_at IS NULL"
                )
            )
