"""One user cannot take the API's database pool: its connections carry timeouts, a pool wait ends
in 503 with `Retry-After`, and writes to one chat pass a gate before they take a connection."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator

import anyio.to_thread
import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api.gate import Gates
from app.errors import Unavailable
from app.main import create_app
from app.settings import Settings
from harness.processes import ApiProcess, wait_until
from tests.conftest import LOG_DIR, RUN_ID
from tests.support import AuthHeaders, app_state
from tests.test_handlers import message


def api_client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(**settings)))  # type: ignore[arg-type]


def new_chat(client: TestClient | httpx.Client, headers: dict[str, str]) -> str:
    response = client.post("/chats", json={}, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_api_connections_carry_statement_lock_and_idle_timeouts() -> None:
    settings = Settings(
        api_statement_timeout_ms=1234,
        api_lock_timeout_ms=567,
        api_idle_in_transaction_timeout_ms=8910,
    )
    engine = create_app(settings).state.engine
    try:
        with engine.connect() as connection:
            shown = {
                name: connection.exec_driver_sql(f"SHOW {name}").scalar_one()
                for name in (
                    "statement_timeout",
                    "lock_timeout",
                    "idle_in_transaction_session_timeout",
                )
            }
    finally:
        engine.dispose()
    assert shown == {
        "statement_timeout": "1234ms",
        "lock_timeout": "567ms",
        "idle_in_transaction_session_timeout": "8910ms",
    }
    assert engine.pool.timeout() == settings.api_pool_timeout_seconds


def test_the_default_api_timeouts_are_set(settings: Settings) -> None:
    engine = create_app(settings).state.engine
    try:
        with engine.connect() as connection:
            lock = connection.exec_driver_sql("SHOW lock_timeout").scalar_one()
            statement = connection.exec_driver_sql("SHOW statement_timeout").scalar_one()
    finally:
        engine.dispose()
    assert lock != "0" and statement != "0"


class RowLock:
    """A chat's row lock held from a connection of the test's own, as a long write would."""

    def __init__(self) -> None:
        self.connection = psycopg.connect(os.environ["DATABASE_URL"])

    def hold(self, chat_id: str) -> None:
        self.connection.execute("SELECT 1 FROM copilot_chats WHERE id = %s FOR UPDATE", (chat_id,))

    def release(self) -> None:
        self.connection.rollback()


@pytest.fixture()
def row_lock() -> Iterator[RowLock]:
    lock = RowLock()
    yield lock
    lock.release()
    lock.connection.close()


def test_a_lock_wait_past_the_limit_is_503_with_retry_after(
    auth: AuthHeaders, row_lock: RowLock
) -> None:
    with api_client(api_lock_timeout_ms=200) as client:
        chat = new_chat(client, auth("pool-lock"))
        row_lock.hold(chat)
        # Without a lock timeout the append would wait for this lock as long as it is held.
        releaser = threading.Timer(10, row_lock.release)
        releaser.start()
        response = client.post(
            f"/chats/{chat}/messages", json={"message": message()}, headers=auth("pool-lock")
        )
        releaser.cancel()
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert "API_LOCK_TIMEOUT_MS=200" in response.json()["detail"][0]["msg"]


def test_a_pool_wait_past_the_limit_is_503_with_retry_after(auth: AuthHeaders) -> None:
    with api_client(
        api_pool_size=1, api_pool_max_overflow=0, api_pool_timeout_seconds=0.3
    ) as client:
        engine = app_state(client).engine
        with engine.connect():  # the pool's only connection
            response = client.post("/chats", json={}, headers=auth("pool-wait"))
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1"
        assert "API_POOL_TIMEOUT_SECONDS=0.3" in response.json()["detail"][0]["msg"]
        assert client.post("/chats", json={}, headers=auth("pool-wait")).status_code == 201


def test_the_gate_admits_a_few_queues_a_few_and_turns_the_rest_away() -> None:
    async def scenario() -> list[str]:
        gates = Gates(concurrency=2, queue=1, wait_seconds=0.2)
        events: list[str] = []
        release = asyncio.Event()

        async def write(name: str, key: str = "chat") -> None:
            try:
                async with gates.hold(key):
                    events.append(f"{name} in")
                    await release.wait()
            except Unavailable:
                events.append(f"{name} refused")

        tasks = [asyncio.create_task(write(name)) for name in "abcd"]
        await asyncio.sleep(0.05)
        assert events == ["a in", "b in", "d refused"]
        assert (gates.admitted("chat"), gates.waiting("chat")) == (2, 1)
        release.set()
        await asyncio.gather(*tasks)
        assert "c in" in events
        assert (gates.admitted("chat"), gates.waiting("chat")) == (0, 0)

        # A waiter whose turn does not come in time is refused and leaves no trace; other
        # chats are not held back meanwhile.
        release.clear()
        events.clear()
        tasks = [asyncio.create_task(write(name)) for name in "ef"]
        await asyncio.sleep(0.01)
        other = asyncio.create_task(write("x", key="other chat"))
        await write("g")
        assert events == ["e in", "f in", "x in", "g refused"]
        assert (gates.admitted("chat"), gates.waiting("chat")) == (2, 0)
        release.set()
        await asyncio.gather(*tasks, other)
        assert gates.admitted("chat") == 0 and gates.admitted("other chat") == 0
        return events

    asyncio.run(scenario())


def waiting_on_locks() -> int:
    """API backends waiting for a lock (the chat's row lock)."""
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as connection:
        return int(
            connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'chat-dualwrite-api' AND wait_event_type = 'Lock'"
            ).fetchone()[0]  # type: ignore[index]
        )


def test_a_burst_on_one_chat_holds_two_connections_and_turns_the_rest_away(
    auth: AuthHeaders,
    row_lock: RowLock,
) -> None:
    """Twelve concurrent appends to a chat whose row is locked: two take a connection and wait
    on the lock, four wait in the API without one, six get 503 with `Retry-After` at once;
    another user's requests go through meanwhile; once the lock goes, the admitted six are
    stored."""
    # The user's own cap above the burst: this is the chat's gate alone.
    env = {
        **os.environ,
        "CHAT_WRITE_CONCURRENCY": "2",
        "CHAT_WRITE_QUEUE": "4",
        "USER_CONCURRENCY": "16",
    }
    api = ApiProcess(env, LOG_DIR / f"api-gate-{RUN_ID}.log").start()
    statuses: Counter[int] = Counter()
    retry_after: list[str | None] = []
    owner, bystander = auth("pool-burst"), auth("pool-bystander")
    try:
        with httpx.Client(base_url=api.base, timeout=60) as http:
            chat = new_chat(http, owner)
            row_lock.hold(chat)

            def append() -> None:
                body = {"message": message()}
                response = http.post(f"/chats/{chat}/messages", json=body, headers=owner)
                statuses[response.status_code] += 1
                if response.status_code == 503:
                    retry_after.append(response.headers.get("Retry-After"))

            threads = [threading.Thread(target=append) for _ in range(12)]
            for thread in threads:
                thread.start()
            wait_until(lambda: statuses[503] >= 6, 30, what="the refused appends")
            wait_until(lambda: waiting_on_locks() >= 2, 30, what="two appends on the lock")
            assert waiting_on_locks() == 2
            assert statuses == Counter({503: 6})
            assert retry_after == ["1"] * 6
            other = new_chat(http, bystander)
            body = {"message": message()}
            response = http.post(f"/chats/{other}/messages", json=body, headers=bystander)
            assert response.status_code == 201
            row_lock.release()
            for thread in threads:
                thread.join()
            assert statuses == Counter({503: 6, 201: 6})
            stored = http.get(f"/chats/{chat}", headers=owner).json()["messages"]
            assert len(stored) == 6
    finally:
        api.stop()


def test_a_request_takes_its_users_gate_once(auth: AuthHeaders) -> None:
    """The body and the unit of work share the request's place at the user's gate: with one
    place and no queue, a request with a body still goes through."""
    with api_client(user_concurrency=1, user_queue=0) as client:
        headers = auth("user-gate-once")
        chat = new_chat(client, headers)
        body = {"messages": [message()]}
        assert client.put(f"/chats/{chat}/messages", json=body, headers=headers).status_code == 200
        assert client.get(f"/chats/{chat}", headers=headers).status_code == 200
        assert app_state(client).user_gates.admitted("user-gate-once") == 0


def test_one_users_burst_past_their_cap_is_503_while_another_user_goes_through(
    auth: AuthHeaders,
    row_lock: RowLock,
) -> None:
    """A user with USER_CONCURRENCY=2 and USER_QUEUE=1: two appends wait on locked chats (each
    holding a connection and a thread), a read waits in the API without either, and the user's
    next reads and writes, bodies included, get 503 with `Retry-After` at once, naming the
    setting. Another user's creates, appends and reads go through meanwhile; once the lock
    goes, the admitted three finish."""
    env = {**os.environ, "USER_CONCURRENCY": "2", "USER_QUEUE": "1", "USER_WAIT_SECONDS": "60"}
    api = ApiProcess(env, LOG_DIR / f"api-user-gate-{RUN_ID}.log").start()
    owner, bystander = auth("user-burst"), auth("user-bystander")
    results: dict[str, httpx.Response] = {}
    try:
        with httpx.Client(base_url=api.base, timeout=60) as http:
            first, second, third = (new_chat(http, owner) for _ in range(3))
            row_lock.hold(first)
            row_lock.hold(second)

            def send(name: str, method: str, path: str, body: object = None) -> None:
                results[name] = http.request(method, path, json=body, headers=owner)

            held = [
                threading.Thread(
                    target=send,
                    args=(
                        f"append {chat}",
                        "POST",
                        f"/chats/{chat}/messages",
                        {"message": message()},
                    ),
                )
                for chat in (first, second)
            ]
            for thread in held:
                thread.start()
            wait_until(lambda: waiting_on_locks() >= 2, 30, what="two appends on the locks")
            queued = threading.Thread(target=send, args=("queued read", "GET", f"/chats/{third}"))
            queued.start()
            time.sleep(0.5)  # the read is in the user's queue, not answered
            assert "queued read" not in results

            refused = [
                http.get(f"/chats/{third}?limit=1", headers=owner),
                http.put(f"/chats/{third}/messages", json={"messages": []}, headers=owner),
                http.post("/chats", json={}, headers=owner),
            ]
            for response in refused:
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"] == "1"
                assert "USER_CONCURRENCY=2" in response.json()["detail"][0]["msg"]

            started = time.monotonic()
            other = new_chat(http, bystander)
            body = {"message": message()}
            response = http.post(f"/chats/{other}/messages", json=body, headers=bystander)
            assert response.status_code == 201, response.text
            assert http.get(f"/chats/{other}", headers=bystander).status_code == 200
            assert time.monotonic() - started < 5

            row_lock.release()
            for thread in [*held, queued]:
                thread.join()
            assert [results[f"append {chat}"].status_code for chat in (first, second)] == [201, 201]
            assert results["queued read"].status_code == 200
    finally:
        api.stop()


def test_a_body_that_waits_past_its_parse_turn_is_503_with_retry_after(auth: AuthHeaders) -> None:
    """Large bodies are parsed one at a time per process; one whose turn does not come within
    BODY_PARSE_WAIT_SECONDS is answered 503 with `Retry-After`, and the next one goes through.
    A small body takes no turn: it goes through meanwhile."""
    with api_client(body_parse_wait_seconds=0.3) as client:
        headers = auth("parse-wait")
        chat = new_chat(client, headers)
        large = {"messages": [message(content="x" * 100_000)]}  # above the 64 KiB envelope
        path = f"/chats/{chat}/messages"
        assert client.put(path, json=large, headers=headers).status_code == 200  # makes the turn
        turn, _ = app_state(client).body_parsing
        held, release = threading.Event(), threading.Event()

        async def hold() -> None:
            async with turn:
                held.set()
                await anyio.to_thread.run_sync(release.wait)

        holder = client.portal.start_task_soon(hold)  # type: ignore[union-attr]
        assert held.wait(10)
        try:
            refused = client.put(path, json=large, headers=headers)
            small = client.post("/chats", json={}, headers=headers)
        finally:
            release.set()
            holder.result(10)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert "BODY_PARSE_WAIT_SECONDS=0.3" in refused.json()["detail"][0]["msg"]
        assert refused.json()["detail"][0]["loc"] == ["body"]
        assert small.status_code == 201, small.text
        assert client.put(path, json=large, headers=headers).status_code == 200
