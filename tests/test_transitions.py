"""Every phase transition, forward and back, under live traffic from several clients, with a real
API process and a real worker: no request fails, no acknowledged message is lost or duplicated,
each client reads its own last write, and after each quiet period JSONB and table are equal."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from app.settings import Settings
from harness.processes import WorkerProcess
from tasks.publish import producer
from tests.conftest import LOG_DIR, RUN_ID, RedisServer, free_port
from tests.support import ROOT, AuthHeaders, SetPhase, mismatch, wait_until

CLIENTS = 3
PATH = [
    "verify_reads",
    "read_table",
    "table_only",
    "read_table",
    "table_only",
    "read_table",
    "verify_reads",
    "dual_write",
    "jsonb_only",
    "dual_write",
]


@pytest.fixture()
def api_process(broker: RedisServer, fault_worker: WorkerProcess) -> Iterator[str]:
    """`uvicorn app.main:app` on a port of its own, publishing to the test's broker."""
    port = free_port()
    log = (LOG_DIR / f"api-{RUN_ID}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--no-access-log"],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": broker.url},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, timeout=60)
        yield base
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def phase_set(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "phase", "set", name],
        cwd=ROOT,
        env={**os.environ, "PHASE_GATE_MIN_SECONDS": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def reconcile() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "reconcile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@dataclass
class Client:
    """Plays a person chatting in chats of their own: a turn (user message, then the reply),
    now and then an inbox pair or a snapshot replace; after each write it reads the chat back."""

    base: str
    headers: dict[str, str]
    seed: int
    chats: list[str] = field(default_factory=list)
    acked: dict[str, list[str]] = field(default_factory=dict)  # chat -> ids, in order
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    paused: threading.Event = field(default_factory=threading.Event)

    def run(self, go: threading.Event, stop: threading.Event) -> None:
        rng = random.Random(self.seed)
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=60) as http:
            for _ in range(2):
                chat = self._ok(http.post("/chats", json={"title": "t"}), 201)["id"]
                self.chats.append(chat)
                self.acked[chat] = []
            while not stop.is_set():
                if not go.is_set():
                    self.paused.set()  # between two steps: nothing of ours is in flight
                    go.wait()
                    self.paused.clear()
                if stop.is_set():
                    return
                try:
                    self._step(http, rng)
                except AssertionError as error:
                    self.failures.append(str(error))
                except httpx.HTTPError as error:
                    self.failures.append(f"{type(error).__name__}: {error}")

    def _ok(self, response: httpx.Response, status: int) -> Any:
        self.requests += 1
        assert response.status_code == status, f"{response.request.url}: {response.text}"
        return response.json() if response.content else None

    def _step(self, http: httpx.Client, rng: random.Random) -> None:
        chat = rng.choice(self.chats)
        kind = rng.random()
        if kind < 0.75:
            user = element("user")
            self._ok(http.post(f"/chats/{chat}/messages", json={"message": user}), 201)
            self.acked[chat].append(user["id"])
            self._reads_own(http, chat)
            reply = element("assistant")
            self._ok(
                http.post(f"/chats/{chat}/turns/{user['id']}/complete", json={"message": reply}),
                201,
            )
            self.acked[chat].append(reply["id"])
        elif kind < 0.9:
            pair = {"user": element("user"), "assistant": element("assistant")}
            self._ok(http.post(f"/chats/{chat}/inbox", json=pair), 201)
            self.acked[chat] += [pair["user"]["id"], pair["assistant"]["id"]]
        else:  # a snapshot replace that drops the oldest message
            current = self._ok(http.get(f"/chats/{chat}"), 200)["messages"]
            kept = current[1:]
            self._ok(http.put(f"/chats/{chat}/messages", json={"messages": kept}), 200)
            if current:
                self.acked[chat].remove(current[0]["id"])
        self._reads_own(http, chat)

    def _reads_own(self, http: httpx.Client, chat: str) -> None:
        last = self.acked[chat][-1] if self.acked[chat] else None
        whole = self._ok(http.get(f"/chats/{chat}"), 200)["messages"]
        assert [m["id"] for m in whole] == self.acked[chat], f"chat {chat} reads back wrong"
        page = self._ok(http.get(f"/chats/{chat}/messages?limit=5"), 200)["messages"]
        assert (page[-1]["id"] if page else None) == last, f"page of {chat} misses {last}"


def element(role: str) -> dict[str, Any]:
    return {"id": f"m-{uuid.uuid4().hex[:12]}", "role": role, "content": f"{role} says hi"}


def quiet_and_equal(
    engine: Engine, broker: RedisServer, clients: list[Client], *, copying: bool = True
) -> None:
    """With traffic paused: the follower store catches up (the sweep repairs what was never
    published), then each chat's JSONB equals its rows and holds exactly what was acked. In
    `jsonb_only` (`copying=False`) nothing is copied yet: only the JSONB is checked."""
    chats = [c for client in clients for c in client.chats]
    if not copying:
        with engine.connect() as connection:
            for client in clients:
                for chat in client.chats:
                    jsonb = connection.execute(
                        text("SELECT messages FROM copilot_chats WHERE id = :id"), {"id": chat}
                    ).scalar_one()
                    assert [m["id"] for m in jsonb] == client.acked[chat], chat
        return
    sender = producer(Settings(redis_url=broker.url))

    def caught_up() -> bool:
        with engine.connect() as connection:
            behind = connection.execute(
                text(
                    "SELECT count(*) FROM copilot_chat_sync_state "
                    "WHERE applied_version < wanted_version AND chat_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": chats},
            ).scalar_one()
        if behind:
            sender.send_task("chats.sweep")
        return bool(behind == 0)

    wait_until(caught_up, timeout=60, interval=0.3)
    with engine.connect() as connection:
        for client in clients:
            for chat in client.chats:
                jsonb, rows = connection.execute(
                    text(
                        "SELECT messages, (SELECT coalesce(jsonb_agg(content ORDER BY seq), "
                        "'[]') FROM copilot_chat_messages WHERE chat_id = c.id "
                        "AND deleted_at IS NULL) FROM copilot_chats c WHERE c.id = :id"
                    ),
                    {"id": chat},
                ).one()
                assert [m["id"] for m in jsonb] == client.acked[chat], chat
                assert rows == jsonb, chat
                assert mismatch(engine, chat) is None, chat


def test_every_transition_under_live_traffic_loses_nothing(
    api_process: str,
    auth: AuthHeaders,
    engine: Engine,
    broker: RedisServer,
    set_phase: SetPhase,
) -> None:
    clients = [Client(api_process, auth(f"client-{i}"), seed=i) for i in range(CLIENTS)]
    go, stop = threading.Event(), threading.Event()
    threads = [threading.Thread(target=c.run, args=(go, stop)) for c in clients]
    for thread in threads:
        thread.start()
    try:
        for target in PATH:
            go.set()
            wait_until(lambda: all(c.requests >= 10 for c in clients), timeout=60)
            for c in clients:
                c.requests = 0
            if target == "read_table":
                reconcile()  # under traffic: chats merely behind are lag, not drift
            moved = phase_set(target)
            assert moved.returncode == 0, moved.stdout + moved.stderr
            assert moved.stdout.rstrip().endswith(f"phase: {target}")
            wait_until(lambda: all(c.requests >= 10 for c in clients), timeout=60)
            go.clear()
            wait_until(lambda: all(c.paused.is_set() for c in clients), timeout=60)
            quiet_and_equal(engine, broker, clients, copying=target != "jsonb_only")
            failures = [f for c in clients for f in c.failures]
            assert failures == [], f"after moving to {target}: {failures[:5]}"
    finally:
        stop.set()
        go.set()
        for thread in threads:
            thread.join(60)
    assert sum(len(ids) for c in clients for ids in c.acked.values()) > 100
    with engine.connect() as connection:
        history = connection.execute(
            text("SELECT to_phase FROM dualwrite_phase_changes ORDER BY id")
        ).scalars()
        assert list(history)[-len(PATH) :] == PATH


def test_table_only_seq_is_race_free_under_concurrent_appends_to_one_chat(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    worker: WorkerProcess,
    set_phase: SetPhase,
) -> None:
    chat = api.post("/chats", json={}, headers=auth()).json()["id"]
    set_phase("table_only")
    ids: list[str] = []
    lock = threading.Lock()

    def append(n: int) -> None:
        for _ in range(n):
            message = element("user")
            response = api.post(
                f"/chats/{chat}/messages", json={"message": message}, headers=auth()
            )
            assert response.status_code == 201, response.text
            with lock:
                ids.append(message["id"])

    threads = [threading.Thread(target=append, args=(15,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with engine.connect() as connection:
        seqs = connection.execute(
            text(
                "SELECT seq FROM copilot_chat_messages WHERE chat_id = :id "
                "AND deleted_at IS NULL ORDER BY seq"
            ),
            {"id": chat},
        ).scalars()
        assert list(seqs) == list(range(60))
    assert len(set(ids)) == 60


def test_table_only_appends_never_wait_for_the_chat_row(
    api: TestClient, auth: AuthHeaders, engine: Engine, set_phase: SetPhase
) -> None:
    """The reverse sync holds the chat's `copilot_chats` row while it rewrites a transcript
    (~200 ms for 5,000 messages); an append in table_only must not queue behind it."""
    chat = api.post("/chats", json={}, headers=auth()).json()["id"]
    set_phase("table_only")
    done: list[int] = []
    with engine.connect() as holder:
        holder.execute(  # what the reverse sync's UPDATE locks, held open
            text("UPDATE copilot_chats SET updated_at = now() WHERE id = :id"), {"id": chat}
        )

        def append() -> None:
            response = api.post(
                f"/chats/{chat}/messages", json={"message": element("user")}, headers=auth()
            )
            done.append(response.status_code)

        thread = threading.Thread(target=append)
        thread.start()
        try:
            wait_until(lambda: done, timeout=20)  # while the row is still locked
        finally:
            holder.rollback()
            thread.join(30)
    assert done == [201]


def test_table_only_refuses_jsonb_writes_that_the_reverse_sync_would_erase(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    set_phase: SetPhase,
) -> None:
    """A script or an old release writing the JSONB in table_only would be acknowledged, then
    overwritten by the next reverse sync: the write is refused instead, and nothing changes."""
    chat = api.post("/chats", json={}, headers=auth()).json()["id"]
    set_phase("table_only")
    with engine.connect() as connection:
        before = connection.execute(
            text("SELECT messages, messages_version FROM copilot_chats WHERE id = :id"),
            {"id": chat},
        ).one()
    with pytest.raises(DBAPIError) as refused, engine.begin() as connection:
        connection.execute(
            text(
                'UPDATE copilot_chats SET messages = messages || \'[{"id": "x"}]\' WHERE id = :id'
            ),
            {"id": chat},
        )
    assert "read-only in phase table_only" in str(refused.value)
    with engine.connect() as connection:
        after = connection.execute(
            text("SELECT messages, messages_version FROM copilot_chats WHERE id = :id"),
            {"id": chat},
        ).one()
    assert tuple(after) == tuple(before)
    # The service's own writes go to the rows, and the reverse sync may still write the JSONB.
    appended = api.post(
        f"/chats/{chat}/messages", json={"message": element("user")}, headers=auth()
    )
    assert appended.status_code == 201, appended.text
