"""Delivery guarantees under real faults: a Redis server of the test's own that is stopped and
paused, worker processes killed mid-sync (on Redis and on RabbitMQ), PostgreSQL backends
terminated."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app import metrics
from app.broker import producer
from app.db import transaction
from app.repositories import chats as chats_repo
from app.settings import Settings
from app.task_names import SWEEP, SYNC_CHAT, Queue
from tests.conftest import (
    MAX_REDELIVERIES,
    MAX_RETRIES,
    Broker,
    RedisServer,
    broker_settings,
    start_worker,
)
from tests.support import (
    AuthHeaders,
    SessionFactory,
    WorkerProcess,
    app_state,
    assert_converged,
    wait_converged,
    wait_until,
)
from tests.test_handlers import message


def new_chat(api: TestClient, auth: AuthHeaders) -> str:
    response = api.post("/chats", json={}, headers=auth())
    assert response.status_code == 201
    return str(response.json()["id"])


BOTH_BROKERS = pytest.mark.parametrize("fault_broker", ["redis", "amqp"], indirect=True)


def run_sweep(broker: Broker) -> str:
    return str(producer(broker_settings(broker)).send_task(SWEEP).id)


def run_sweep_and_wait(broker: Broker, worker: WorkerProcess) -> dict[str, int]:
    """Run a sweep on this worker and return its report (behind, sent, coalesced, failed)."""
    task_id = run_sweep(broker)
    found = wait_until(
        lambda: re.search(rf"Task {SWEEP}\[{task_id}\] succeeded in \S+: (\{{.*\}})", worker.log()),
        timeout=30,
    )
    report: dict[str, int] = ast.literal_eval(found.group(1))
    return report


def queue_drained(broker: Broker) -> bool:
    """No sync waits in the queue and none is delivered but unacked."""
    return broker.drained(Queue.SYNC.value)


def dead_letters_of(engine: Engine, chat_id: str) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        return [
            (r.reason, r.attempts)
            for r in connection.execute(
                text(
                    "SELECT reason, attempts FROM dualwrite_dead_letters "
                    "WHERE chat_id = :id AND resolved_at IS NULL"
                ),
                {"id": chat_id},
            )
        ]


@pytest.mark.parametrize("fault", ["stopped", "hung", "out_of_memory"])
def test_broker_fault_never_fails_a_request_and_the_sweep_repairs(
    fault: str,
    broker: RedisServer,
    fault_worker: WorkerProcess,
    fault_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    settings: Settings,
) -> None:
    chats = [new_chat(fault_api, auth) for _ in range(10)]
    failures = metrics.ENQUEUE_FAILURES.labels("chats.sync_messages")
    failures_before = failures._value.get()
    # What one send may wait for; a request waits for no send at all.
    bound = (settings.publish_connect_timeout_seconds + settings.publish_socket_timeout_seconds) * (
        settings.publish_max_retries + 1
    ) + settings.publish_max_retries * settings.publish_retry_interval_seconds

    def post(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = fault_api.post(
            f"/chats/{chats[i % 10]}/messages", json={"message": message()}, headers=auth()
        )
        return response.status_code, time.perf_counter() - started

    if fault == "stopped":
        broker.stop()
    elif fault == "hung":
        os.kill(broker.pid, signal.SIGSTOP)
    else:
        broker.client().config_set("maxmemory", 1)  # with noeviction: every write is refused
    try:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(post, range(100)))
        # The background publisher tries every job while the fault lasts: each one fails, and
        # is counted and absorbed. A write whose chat's sync was marked queued by an earlier
        # write sends none; each failed job releases its mark, so every chat sends at least one.
        wait_until(lambda: app_state(fault_api).publisher.pending() == 0, timeout=60)
        assert 10 <= failures._value.get() - failures_before <= 100
        with engine.connect() as connection:
            marked = connection.execute(
                text(
                    "SELECT count(*) FROM copilot_chat_sync_state "
                    "WHERE queued_since IS NOT NULL AND chat_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": chats},
            ).scalar_one()
        assert marked == 0  # nothing holds back the chats' next writes
    finally:
        if fault == "stopped":
            broker.start()
        elif fault == "hung":
            os.kill(broker.pid, signal.SIGCONT)
        else:
            broker.client().config_set("maxmemory", 0)
    assert [status for status, _ in results] == [201] * 100
    slowest = max(seconds for _, seconds in results)
    assert slowest < bound + 0.5, f"a request took {slowest:.2f}s, publish bound {bound:.2f}s"

    run_sweep(broker)
    wait_converged(engine, chats, timeout=60)


def test_a_worker_outlives_its_broker_restarting_under_unacked_deliveries(
    broker: RedisServer,
    hooks: Path,
    fault_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    """Redis dies (nothing saved) while the worker's two children each hold a sync delivered
    but not acked, and more are queued. The syncs end while the broker is away, so their acks
    have nowhere to go. The worker process lives on, reconnects when Redis is back, and the
    sweep sends again what the broker lost (its queued marks expire after the coalescing
    ttl): every chat converges through that same process."""
    worker = start_worker(broker, hooks, "restart", COALESCE_TTL_SECONDS="2")
    try:
        held = [new_chat(fault_api, auth) for _ in range(2)]
        queued = [new_chat(fault_api, auth) for _ in range(4)]
        for chat_id in held:
            (hooks / f"slow-{chat_id}").touch()
            fault_api.post(
                f"/chats/{chat_id}/messages", json={"message": message()}, headers=auth()
            )
        for chat_id in held:
            wait_until(lambda: (hooks / f"running-{chat_id}").exists(), timeout=30)  # noqa: B023
        for chat_id in queued:
            fault_api.post(
                f"/chats/{chat_id}/messages", json={"message": message()}, headers=auth()
            )
        wait_until(lambda: app_state(fault_api).publisher.pending() == 0, timeout=30)
        assert broker.client().hlen("unacked") >= 2  # the two running syncs, acked late
        pid = worker.pid

        broker.stop()
        for chat_id in held:
            (hooks / f"slow-{chat_id}").unlink()  # each sync commits, then cannot ack
        wait_converged(engine, held, timeout=30)
        time.sleep(3)  # the consumer has seen its connection drop, and the queued marks expire
        assert worker.alive(), worker.log()
        broker.start()

        report = run_sweep_and_wait(broker, worker)  # consumed once the worker reconnected
        assert report["sent"] >= len(queued), report  # what died with the broker, sent again
        wait_converged(engine, [*held, *queued], timeout=60)
        assert worker.alive() and worker.pid == pid, worker.log()
    finally:
        worker.stop()


@BOTH_BROKERS
def test_worker_killed_mid_sync_runs_the_sync_again(
    fault_broker: Broker,
    hooks: Path,
    fault_worker: WorkerProcess,
    fault_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    chat_id = new_chat(fault_api, auth)
    (hooks / f"slow-{chat_id}").touch()
    # One append, so one task: the rows can only appear if that task runs again.
    fault_api.post(f"/chats/{chat_id}/messages", json={"message": message()}, headers=auth())
    running = hooks / f"running-{chat_id}"
    pid = int(wait_until(lambda: running.exists() and running.read_text(), timeout=30))
    os.kill(pid, signal.SIGKILL)  # the pool child, inside the sync's open transaction
    (hooks / f"slow-{chat_id}").unlink()
    wait_converged(engine, [chat_id], timeout=60)
    log = fault_worker.log()
    assert "WorkerLostError" in log
    task_id = re.search(r"Task chats.sync_messages\[([0-9a-f-]+)\] received", log).group(1)  # type: ignore[union-attr]
    assert log.count(f"chats.sync_messages[{task_id}] received") == 2  # delivered again
    assert f"chats.sync_messages[{task_id}] succeeded" in log
    assert dead_letters_of(engine, chat_id) == []


@BOTH_BROKERS
def test_a_task_that_always_kills_its_worker_ends_in_the_dead_letters(
    fault_broker: Broker,
    hooks: Path,
    fault_worker: WorkerProcess,
    engine: Engine,
    sessionmaker: SessionFactory,
) -> None:
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session,
            user_id="u",
            title=None,
            model="m",
            workflow_id=None,
            messages=[message()],
        )
    (hooks / f"kill-{chat.id}").touch()
    broker = fault_broker
    task_id = producer(broker_settings(broker)).send_task(SYNC_CHAT, args=(str(chat.id), 1)).id
    wait_until(lambda: dead_letters_of(engine, str(chat.id)), timeout=90)
    assert dead_letters_of(engine, str(chat.id)) == [("worker_lost", MAX_REDELIVERIES + 1)]
    # Nothing loops: the delivery that dead-lettered it ends the task, and its message is acked
    # (neither waiting nor held unacked), so nothing can deliver it again.
    wait_until(lambda: f"[{task_id}] succeeded" in fault_worker.log(), timeout=30)
    wait_until(lambda: queue_drained(broker), timeout=30)
    kills = fault_worker.log().count("exited with 'signal 9 (SIGKILL)'")
    assert kills == MAX_REDELIVERIES + 1
    # The sweep leaves it alone until an operator replays it.
    (hooks / f"kill-{chat.id}").unlink()
    report = run_sweep_and_wait(broker, fault_worker)
    assert report["behind"] == report["sent"] + report["coalesced"]
    wait_until(lambda: queue_drained(broker), timeout=30)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT count(*) FROM copilot_chat_messages WHERE chat_id = :id"),
            {"id": chat.id},
        ).scalar_one()
    assert rows == 0
    assert dead_letters_of(engine, str(chat.id)) == [("worker_lost", MAX_REDELIVERIES + 1)]


@BOTH_BROKERS
def test_terminated_backends_are_retried_within_the_policy(
    fault_broker: Broker,
    hooks: Path,
    fault_worker: WorkerProcess,
    fault_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    chats = [new_chat(fault_api, auth) for _ in range(6)]
    for chat_id in chats[:3]:
        (hooks / f"slow-{chat_id}").write_text("0.5")  # each sync holds its transaction open
    for i in range(30):
        fault_api.post(
            f"/chats/{chats[i % 6]}/messages", json={"message": message()}, headers=auth()
        )
    stop = threading.Event()

    def terminate() -> None:
        while not stop.is_set():
            with engine.connect() as connection:
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND application_name = 'chat-dualwrite-worker'"
                    )
                )
            stop.wait(0.2)  # pacing between rounds; returns at once when stopped

    killer = threading.Thread(target=terminate)
    killer.start()
    try:
        # A sync that fails with other chats is tried alone at once; one that fails alone is
        # retried by the policy. Either shows a terminated backend was retried.
        wait_until(
            lambda: "retry 1 of" in fault_worker.log() or "trying it alone" in fault_worker.log(),
            timeout=30,
        )
    finally:
        for chat_id in chats[:3]:
            (hooks / f"slow-{chat_id}").unlink(missing_ok=True)
        stop.set()
        killer.join()
    wait_converged(engine, chats, timeout=60)
    retries = [int(n) for n in re.findall(r"retry (\d+) of \d+", fault_worker.log())]
    assert retries and max(retries) <= MAX_RETRIES
    assert all(dead_letters_of(engine, c) == [] for c in chats)


def test_poison_elements_are_dead_lettered_at_once_and_the_rest_is_copied(
    broker: RedisServer,
    fault_worker: WorkerProcess,
    engine: Engine,
    sessionmaker: SessionFactory,
) -> None:
    good = [message(), message("assistant")]
    poison: list[Any] = [
        "a bare string",
        {"id": "x" * 2000, "role": "user", "content": "id too long"},
    ]
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session,
            user_id="u",
            title=None,
            model="m",
            workflow_id=None,
            messages=[good[0], *poison, good[1]],
        )
    producer(Settings(redis_url=broker.url)).send_task(SYNC_CHAT, args=(str(chat.id), 1))
    wait_until(lambda: dead_letters_of(engine, str(chat.id)), timeout=30)
    assert dead_letters_of(engine, str(chat.id)) == [("bad_elements", 1)]
    wait_converged(engine, [chat.id])
    assert "retry" not in fault_worker.log()


def test_malformed_task_arguments_are_dropped_without_retry(
    broker: RedisServer, fault_worker: WorkerProcess
) -> None:
    result = producer(Settings(redis_url=broker.url)).send_task(
        SYNC_CHAT, args=("not-a-uuid", "v1")
    )
    wait_until(lambda: f"[{result.id}] succeeded" in fault_worker.log(), timeout=30)
    assert "dropping chats.sync_chat" in fault_worker.log()
    assert "retry" not in fault_worker.log()


def test_concurrent_syncs_in_opposite_order_never_deadlock(
    sessionmaker: SessionFactory, engine: Engine
) -> None:
    from app.services import sync

    with transaction(sessionmaker) as session:
        ids = [
            chats_repo.create(
                session, user_id="u", title=None, model="m", workflow_id=None, messages=[]
            ).id
            for _ in range(8)
        ]
    errors: list[BaseException] = []

    def worker(order: list[uuid.UUID], rounds: int) -> None:
        # Each round changes one chat (ids rotate, so rows are inserted, soft-deleted and
        # restored), then syncs the whole batch in this thread's order.
        try:
            for n in range(rounds):
                snapshot = [message(id=f"m{(n + k) % 5}") for k in range(3)]
                with transaction(sessionmaker) as session:
                    chats_repo.replace_messages(session, order[n % len(order)], "u", snapshot)
                with transaction(sessionmaker) as session:
                    sync.resync(session, order)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(ids, 500)),
        threading.Thread(target=worker, args=(list(reversed(ids)), 500)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_converged(engine, ids)


def test_a_chat_too_large_for_the_statement_timeout_is_dead_lettered_after_one_retry(
    broker: RedisServer,
    hooks: Path,
    engine: Engine,
    sessionmaker: SessionFactory,
) -> None:
    # 30,000 elements take far longer than 100 ms to converge; every other statement of a sync
    # takes a millisecond or two.
    huge = [message(id=f"m{n}", content="x" * 100) for n in range(30_000)]
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session, user_id="u", title=None, model="m", workflow_id=None, messages=huge
        )
    worker = start_worker(broker, hooks, "timeout", WORKER_STATEMENT_TIMEOUT_MS="100")
    try:
        producer(Settings(redis_url=broker.url)).send_task(SYNC_CHAT, args=(str(chat.id), 1))
        wait_until(lambda: dead_letters_of(engine, str(chat.id)), timeout=60)
        log = worker.log()
    finally:
        worker.stop()
    # One retry (of the MAX_RETRIES this worker allows), then the dead letter names the cause.
    assert dead_letters_of(engine, str(chat.id)) == [("failed", 2)]
    assert re.findall(r"retry (\d+) of \d+", log) == ["1"]
    with engine.connect() as connection:
        error = connection.execute(
            text(
                "SELECT error FROM dualwrite_dead_letters "
                "WHERE chat_id = :id AND resolved_at IS NULL"
            ),
            {"id": chat.id},
        ).scalar_one()
    assert error.startswith(
        "statement timeout again on retry 1: the chat is too large for "
        "WORKER_STATEMENT_TIMEOUT_MS=100; raise it for the workers, then replay (QueryCanceled: "
    ), error
    assert "[SQL:" not in error  # the cause, not the whole statement


def test_a_worker_on_a_broker_that_may_evict_warns_once_at_start(
    broker: RedisServer, hooks: Path
) -> None:
    broker.client().config_set("maxmemory-policy", "allkeys-lru")
    worker = start_worker(broker, hooks, "evicting")
    try:
        wanted = re.compile(
            r"WARNING tasks\.startup \[\d+\]: the broker's Redis has maxmemory-policy "
            r"allkeys-lru: .* every task in it is lost silently; set maxmemory-policy noeviction"
        )
        wait_until(lambda: wanted.search(worker.log()), timeout=30)
        assert len(wanted.findall(worker.log())) == 1
    finally:
        worker.stop()


def test_a_worker_on_a_noeviction_broker_says_it_is_safe(fault_worker: WorkerProcess) -> None:
    wait_until(
        lambda: (
            "broker maxmemory-policy is noeviction: queued tasks cannot be evicted"
            in fault_worker.log()
        ),
        timeout=30,
    )
    assert "maxmemory-policy allkeys" not in fault_worker.log()
    assert "could not check the broker's maxmemory-policy" not in fault_worker.log()


class RedisWithoutConfig(RedisServer):
    """A redis-server that refuses CONFIG, as many managed services do."""

    def start(self, timeout: float = 10.0) -> Self:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--rename-command",
                "CONFIG",
                "",
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self.answers, timeout=timeout)
        return self


def test_a_worker_that_cannot_read_the_eviction_policy_says_so(hooks: Path) -> None:
    server = RedisWithoutConfig()
    server.start()
    worker: WorkerProcess | None = None
    try:
        worker = start_worker(server, hooks, "no-config")
        wanted = re.compile(
            r"WARNING tasks\.startup \[\d+\]: could not check the broker's maxmemory-policy .*"
            r"make sure it is noeviction"
        )
        wait_until(lambda: wanted.search(worker.log()), timeout=30)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
