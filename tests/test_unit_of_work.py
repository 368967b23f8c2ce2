"""A request whose database connection dies: run again on a fresh one when its transaction never
reached COMMIT, else 503 with `Retry-After`; never a 500. A real API process, real PostgreSQL,
backends ended with `pg_terminate_backend` (only this run's database, only the API's)."""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, text

from app.settings import Settings
from harness.pgproxy import PgProxy
from harness.processes import ApiProcess
from tests.conftest import ADMIN_DSN, DB_NAME, LOG_DIR, RUN_ID
from tests.support import AuthHeaders
from tests.test_handlers import message

API_NAME = "chat-dualwrite-api"


@pytest.fixture()
def proxy() -> Iterator[PgProxy]:
    running = PgProxy(ADMIN_DSN, DB_NAME, API_NAME).start()
    yield running
    running.close()


@pytest.fixture()
def proxied_api(proxy: PgProxy) -> Iterator[ApiProcess]:
    """An API process whose database connections go through `proxy`."""
    env = {**os.environ, "DATABASE_URL": proxy.url()}
    api = ApiProcess(env, LOG_DIR / f"api-proxied-{RUN_ID}.log").start()
    yield api
    api.stop()


def stored_ids(engine: Engine, chat_id: str) -> set[str]:
    with engine.connect() as connection:
        messages = connection.execute(
            text("SELECT messages FROM copilot_chats WHERE id = :id"), {"id": chat_id}
        ).scalar_one()
    return {m["id"] for m in messages}


def chats_of(engine: Engine, user: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM copilot_chats WHERE user_id = :u"), {"u": user}
            ).scalar_one()
        )


def test_a_connection_ended_before_the_first_statement_is_run_again(
    proxied_api: ApiProcess,
    proxy: PgProxy,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    """The backend dies after the pool's pre-ping passed, as the first statement (the phase
    read) is sent: the operation runs again on a fresh connection and answers 2xx."""
    with httpx.Client(base_url=proxied_api.base, headers=auth("uow-retry"), timeout=30) as http:
        chat = http.post("/chats", json={}).json()["id"]
        proxy.end_backend_on("dualwrite_phase")
        sent = message(id="retried")
        response = http.post(f"/chats/{chat}/messages", json={"message": sent})
        assert response.status_code == 201, response.text
        assert proxy.terminated == ["dualwrite_phase"]
        assert stored_ids(engine, chat) == {"retried"}
        proxy.end_backend_on("dualwrite_phase")
        assert http.get(f"/chats/{chat}").status_code == 200
        proxy.end_backend_on("dualwrite_phase")
        assert http.post("/chats", json={}).status_code == 201
    assert proxy.terminated == ["dualwrite_phase"] * 3
    assert chats_of(engine, "uow-retry") == 2  # the create that was run again made one chat
    assert "database connection lost before the commit" in proxied_api.log()


def test_a_connection_that_keeps_dying_gets_503_with_retry_after(
    proxied_api: ApiProcess,
    proxy: PgProxy,
    auth: AuthHeaders,
    engine: Engine,
    settings: Settings,
) -> None:
    runs = settings.api_connection_retries + 1
    proxy.end_backend_on("dualwrite_phase", times=runs)
    with httpx.Client(base_url=proxied_api.base, headers=auth("uow-dying"), timeout=30) as http:
        response = http.post("/chats", json={})
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == str(settings.api_retry_after_seconds)
        assert "connection was lost" in response.json()["detail"][0]["msg"]
        assert proxy.terminated == ["dualwrite_phase"] * runs
        assert chats_of(engine, "uow-dying") == 0
        assert http.post("/chats", json={}).status_code == 201  # the database is back


def test_a_connection_lost_at_the_commit_is_not_run_again(
    proxied_api: ApiProcess,
    proxy: PgProxy,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    """The outcome of a commit cut off is unknown: running a create again could make two chats,
    so the client gets 503 with `Retry-After`, and the operation is not repeated."""
    proxy.end_backend_on("COMMIT")
    with httpx.Client(base_url=proxied_api.base, headers=auth("uow-commit"), timeout=30) as http:
        response = http.post("/chats", json={})
    assert response.status_code == 503, response.text
    assert "Retry-After" in response.headers
    assert "may or may not be stored" in response.json()["detail"][0]["msg"]
    assert proxy.terminated == ["COMMIT"]
    # Ended before the COMMIT reached it, the transaction rolled back; no second run made one.
    assert chats_of(engine, "uow-commit") == 0


def terminate_api_backends() -> int:
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as connection:
        return len(
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name = %s",
                (API_NAME,),
            ).fetchall()
        )


def test_requests_survive_api_backends_ended_while_they_run(
    auth: AuthHeaders, engine: Engine
) -> None:
    """Clients append while a loop ends every API backend several times a second: no request
    gets a 500, a 503 carries `Retry-After`, and every acknowledged append is stored."""
    api = ApiProcess(dict(os.environ), LOG_DIR / f"api-terminated-{RUN_ID}.log").start()
    statuses: Counter[int] = Counter()
    acknowledged: dict[str, set[str]] = {}
    failures: list[str] = []
    stop = threading.Event()
    ids = itertools.count()

    def record(response: httpx.Response) -> None:
        statuses[response.status_code] += 1
        if response.status_code >= 500 and (
            response.status_code != 503 or "Retry-After" not in response.headers
        ):
            failures.append(f"{response.status_code} {response.text[:200]}")

    def client(index: int) -> None:
        user = f"uow-chaos-{index}"
        with httpx.Client(base_url=api.base, headers=auth(user), timeout=30) as http:
            # The backends are already being ended: the first chat, too, may take a retry.
            chat = None
            while chat is None and not stop.is_set():
                response = http.post("/chats", json={})
                record(response)
                if response.status_code == 201:
                    chat = response.json()["id"]
            if chat is None:
                return
            acknowledged[chat] = set()
            while not stop.is_set():
                if random.random() < 0.1:
                    response = http.post("/chats", json={})
                else:
                    message_id = f"m-{next(ids)}"
                    body = {"message": message(id=message_id)}
                    response = http.post(f"/chats/{chat}/messages", json=body)
                    if response.status_code == 201:
                        acknowledged[chat].add(message_id)
                record(response)

    terminated = 0
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            time.sleep(random.uniform(0.05, 0.2))
            terminated += terminate_api_backends()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        api.stop()
    assert not failures, (failures[:5], statuses)
    assert statuses[201] > 50, statuses
    assert terminated > 10
    for chat, sent in acknowledged.items():
        assert sent <= stored_ids(engine, chat)
    # Requests were caught in flight, and were run again.
    assert "database connection lost before the commit" in api.log()
