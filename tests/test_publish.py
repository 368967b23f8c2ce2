"""Publishing after commit: the API's background publisher (off the request's path, bounded
buffer, batches, shutdown), released marks, counted failures, the time bound."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app import broker as app_broker
from app import metrics
from app.jobs import (
    SYNC_CHAT,
    SYNC_MESSAGES,
    Job,
    JobQueue,
    Published,
    UnsafePublishMany,
    publish_after_commit,
    publish_many_after_commit,
)
from app.main import create_app
from app.publisher import RELEASE_SECONDS, BackgroundPublisher
from app.settings import Settings
from harness.processes import ApiProcess, RedisServer, WorkerProcess
from tasks import publish as sweep_publisher
from tests.conftest import LOG_DIR, RUN_ID, start_worker
from tests.support import AuthHeaders, WaitConverged, app_state, wait_converged, wait_until
from tests.test_faults import run_sweep_and_wait
from tests.test_handlers import message, new_chat

# The publisher, the (task, args) it sent, and the chats whose marks it released.
Sent = list[tuple[str, tuple[object, ...]]]
MemoryPublisher = tuple[app_broker.BoundedPublisher, Sent, list[str]]


@pytest.fixture()
def memory_publisher(monkeypatch: pytest.MonkeyPatch) -> MemoryPublisher:
    """The real publisher over kombu's in-memory transport, recording what it sends and which
    chats' queued marks it releases."""
    sent: Sent = []
    released: list[str] = []
    real_producer = app_broker.producer

    def recording_producer(settings: Settings) -> Celery:
        app = real_producer(settings)
        app.send_task = lambda name, args, **kw: sent.append((name, tuple(args)))
        return app

    monkeypatch.setattr(app_broker, "producer", recording_producer)
    publisher = app_broker.bounded_publisher(Settings(redis_url="memory://"), released.extend)
    return publisher, sent, released


def test_every_job_given_is_sent(memory_publisher: MemoryPublisher) -> None:
    # Coalescing happens before: in the statement that recorded the job (see test_sync).
    publisher, sent, released = memory_publisher
    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "chat-a", 1, queued="chat-a")
    queue.enqueue(SYNC_CHAT, "chat-a", 2)
    before = metrics.ENQUEUED.labels(SYNC_CHAT)._value.get()
    assert publish_after_commit(queue, publisher) == 0
    assert sent == [(SYNC_CHAT, ("chat-a", 1)), (SYNC_CHAT, ("chat-a", 2))]
    assert metrics.ENQUEUED.labels(SYNC_CHAT)._value.get() - before == 2
    assert released == []


def test_a_disabled_queue_records_nothing() -> None:
    queue = JobQueue(enabled=False)
    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    assert queue.jobs == []


def test_a_failing_publish_is_counted_not_raised() -> None:
    def broken(job: Job) -> None:
        raise ConnectionError("broker down")

    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    before = metrics.ENQUEUE_FAILURES.labels(SYNC_CHAT)._value.get()
    assert publish_after_commit(queue, broken) == 1
    assert metrics.ENQUEUE_FAILURES.labels(SYNC_CHAT)._value.get() - before == 1
    assert queue.jobs == []


def test_publish_to_a_dead_port_gives_up_within_its_bound(settings: Settings) -> None:
    publisher = app_broker.bounded_publisher(Settings(redis_url="redis://127.0.0.1:1/0"))
    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "chat-a", 1, queued="chat-a")
    started = time.perf_counter()
    assert publish_after_commit(queue, publisher) == 1
    assert time.perf_counter() - started < 1.0


def test_appends_while_a_task_waits_send_no_new_task(
    broker: RedisServer,
    hooks: Path,
    fault_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    # No worker yet: every task waits in the private broker's queue.
    chat = fault_api.post("/chats", json={}, headers=auth()).json()["id"]
    other = fault_api.post("/chats", json={}, headers=auth()).json()["id"]
    for _ in range(5):
        fault_api.post(f"/chats/{chat}/messages", json={"message": message()}, headers=auth())
    fault_api.post(f"/chats/{other}/messages", json={"message": message()}, headers=auth())
    wait_until(lambda: app_state(fault_api).publisher.pending() == 0, timeout=10)
    assert broker.client().llen("dualwrite.sync") == 2
    worker = start_worker(broker, hooks, "coalesce")
    try:
        wait_converged(engine, [chat, other])
    finally:
        worker.stop()


def test_a_failed_send_releases_the_chat_for_the_next_change(
    monkeypatch: pytest.MonkeyPatch, memory_publisher: MemoryPublisher
) -> None:
    _, _, released = memory_publisher
    real_producer = app_broker.producer

    def refusing_producer(settings: Settings) -> Celery:
        app = real_producer(settings)

        def refuse(*args: object, **kwargs: object) -> None:
            raise ConnectionError("broker down")

        app.send_task = refuse
        return app

    monkeypatch.setattr(app_broker, "producer", refusing_producer)
    failing = app_broker.bounded_publisher(Settings(redis_url="memory://"), released.extend)
    queue = JobQueue()
    queue.enqueue(SYNC_MESSAGES, "chat-f", ["m"], 1, queued="chat-f")
    queue.enqueue(SYNC_CHAT, "chat-g", 1)  # holds no mark: nothing to release
    assert publish_after_commit(queue, failing) == 2
    # The mark is released, so the next change is sent (or fails) rather than held back.
    assert released == ["chat-f"]


def test_a_bulk_publish_sends_through_one_producer(memory_publisher: MemoryPublisher) -> None:
    publisher, sent, _ = memory_publisher
    acquired: list[int] = []
    acquire = publisher.app.producer_or_acquire

    def counting_acquire(*args: Any, **kwargs: Any) -> Any:
        acquired.append(1)
        return acquire(*args, **kwargs)

    publisher.app.producer_or_acquire = counting_acquire
    jobs = [Job(SYNC_CHAT, (f"chat-{n}", 1), f"chat-{n}") for n in range(3)]
    assert publisher.many(jobs) == [None, None, None]
    assert sent == [(SYNC_CHAT, (f"chat-{n}", 1)) for n in range(3)]
    assert len(acquired) == 1


def test_a_bulk_publish_stops_at_the_first_failed_send_and_releases_those_not_sent(
    memory_publisher: MemoryPublisher,
) -> None:
    publisher, _, released = memory_publisher
    attempts: list[str] = []

    def flaky(name: str, args: list[str], **kwargs: object) -> None:
        attempts.append(args[0])
        if len(attempts) > 1:
            raise ConnectionError("broker went away")

    publisher.app.send_task = flaky
    jobs = [Job(SYNC_CHAT, (f"chat-{n}", 1), f"chat-{n}") for n in range(4)]
    outcomes = publisher.many(jobs)
    assert outcomes[0] is None
    assert all(isinstance(o, ConnectionError) for o in outcomes[1:])
    assert attempts == ["chat-0", "chat-1"]  # no timeout waited out per remaining job
    assert released == ["chat-1", "chat-2", "chat-3"]  # chat-0's task waits: its mark stays


def test_a_bulk_publish_counts_each_outcome_and_never_raises() -> None:
    queue = JobQueue()
    for chat in ("chat-a", "chat-b", "chat-c"):
        queue.enqueue(SYNC_CHAT, chat, 1, queued=chat)
    before = {
        counter: counter.labels(SYNC_CHAT)._value.get()
        for counter in (metrics.ENQUEUED, metrics.ENQUEUE_FAILURES)
    }
    report = publish_many_after_commit(queue, lambda jobs: [None, None, ConnectionError("x")])
    assert report == Published(sent=2, failed=1)
    assert [c.labels(SYNC_CHAT)._value.get() - v for c, v in before.items()] == [2, 1]
    assert queue.jobs == []

    def down(jobs: Sequence[Job]) -> list[Exception | None]:
        raise ConnectionError("broker down")

    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    queue.enqueue(SYNC_CHAT, "chat-b", 1)
    assert publish_many_after_commit(queue, down) == Published(failed=2)


def test_the_sweep_reuses_one_publisher_per_process() -> None:
    first = sweep_publisher.process_publisher()
    assert sweep_publisher.process_publisher() is first
    assert first.app is sweep_publisher.process_publisher().app


def test_a_countdown_is_passed_to_the_send(memory_publisher: MemoryPublisher) -> None:
    publisher, _, _ = memory_publisher
    options: list[dict[str, object]] = []
    publisher.app.send_task = lambda name, args, **kwargs: options.append(kwargs)
    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "chat-d", 1, queued="chat-d", countdown=90.5)
    queue.enqueue(SYNC_CHAT, "chat-e", 1, queued="chat-e")
    assert queue.jobs[0] == Job(SYNC_CHAT, ("chat-d", 1), "chat-d", 90.5)
    assert publish_after_commit(queue, publisher) == 0
    assert [o["countdown"] for o in options] == [90.5, None]


# ---------------------------------------------------------------------------------------------
# The API's background publisher (`app.publisher`).


class Gate:
    """A `send_many` that holds its first batch until released, then sends through `send`."""

    def __init__(self, send: UnsafePublishMany) -> None:
        self.send = send
        self.entered = threading.Event()
        self.released = threading.Event()
        self.batches: list[list[Job]] = []

    def __call__(self, jobs: Sequence[Job]) -> Sequence[Exception | None]:
        self.entered.set()
        if not self.released.wait(60):
            raise TimeoutError("the test never released the gate")
        self.batches.append(list(jobs))
        return self.send(jobs)


def dropped(reason: str) -> float:
    return float(metrics.PUBLISH_DROPPED.labels(reason)._value.get())


def append(client: TestClient, auth: AuthHeaders, chat_id: str) -> None:
    response = client.post(
        f"/chats/{chat_id}/messages", json={"message": message()}, headers=auth()
    )
    assert response.status_code == 201, response.text


def behind(engine: Engine, chat_ids: list[str]) -> list[str]:
    with engine.connect() as connection:
        return sorted(
            str(chat)
            for (chat,) in connection.execute(
                text(
                    "SELECT chat_id FROM copilot_chat_sync_state "
                    "WHERE chat_id = ANY(CAST(:ids AS uuid[])) AND applied_version < wanted_version"
                ),
                {"ids": chat_ids},
            )
        )


def test_the_response_is_sent_while_the_publish_is_blocked(
    settings: Settings,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
) -> None:
    gate = Gate(app_broker.BoundedPublisher(settings).many)
    app = create_app(settings, send_many=gate)
    try:
        with TestClient(app) as client:
            chat, other = new_chat(client, auth), new_chat(client, auth)
            append(client, auth, chat)
            wait_until(gate.entered.is_set, timeout=10)
            # The publisher is stuck in its send; requests go on answering.
            append(client, auth, other)
            append(client, auth, chat)  # its chat's sync is queued already: nothing to send
            assert gate.batches == []
            assert app.state.publisher.pending() == 2
            assert behind(engine, [chat, other]) == sorted([chat, other])
            gate.released.set()
            converged(chat)
            converged(other)
            assert app.state.publisher.pending() == 0
            assert sum(len(batch) for batch in gate.batches) == 2
    finally:
        gate.released.set()
        app.state.engine.dispose()


def test_a_full_buffer_drops_and_counts_and_the_sweep_converges_the_chats(
    broker: RedisServer,
    fault_worker: WorkerProcess,
    auth: AuthHeaders,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(redis_url=broker.url, publish_buffer_size=2, publish_batch_size=1)
    gate = Gate(app_broker.BoundedPublisher(settings).many)
    app = create_app(settings, send_many=gate)
    before = dropped("buffer_full")
    try:
        with TestClient(app) as client, caplog.at_level(logging.WARNING, "app.publisher"):
            chats = [new_chat(client, auth) for _ in range(5)]
            append(client, auth, chats[0])
            wait_until(gate.entered.is_set, timeout=10)  # its job is taken: the buffer is empty
            for chat in chats[1:]:
                append(client, auth, chat)  # two fit, two are dropped; every request succeeds
            assert dropped("buffer_full") - before == 2
            scraped = client.get("/metrics").text
            assert "dualwrite_publish_buffered 3.0" in scraped  # one being sent, two waiting
            assert 'dualwrite_publish_dropped_total{reason="buffer_full"}' in scraped
            full = [r for r in caplog.records if "publish buffer full" in r.getMessage()]
            assert len(full) == 1  # once per burst, not once per job
            gate.released.set()
            wait_until(lambda: app.state.publisher.pending() == 0, timeout=10)
            wait_converged(engine, chats[:3])
            assert behind(engine, chats) == sorted(chats[3:])
        run_sweep_and_wait(broker, fault_worker)
        wait_converged(engine, chats)
    finally:
        gate.released.set()
        app.state.engine.dispose()


def test_shutdown_sends_the_jobs_still_buffered(
    settings: Settings, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    gate = Gate(app_broker.BoundedPublisher(settings).many)
    app = create_app(settings, send_many=gate)
    publisher = app.state.publisher
    before = dropped("shutdown")

    def release_once_closing() -> None:
        wait_until(lambda: publisher.closing, timeout=30)
        gate.released.set()

    releaser = threading.Thread(target=release_once_closing)
    try:
        with TestClient(app) as client:
            chats = [new_chat(client, auth) for _ in range(3)]
            append(client, auth, chats[0])
            wait_until(gate.entered.is_set, timeout=10)
            for chat in chats[1:]:
                append(client, auth, chat)
            assert publisher.pending() == 3  # one being sent, two buffered
            releaser.start()
        # The lifespan's end waited for all three.
        assert publisher.pending() == 0
        assert dropped("shutdown") == before
        assert sorted(job.args[0] for batch in gate.batches for job in batch) == sorted(chats)
        converged(*chats)
    finally:
        gate.released.set()
        if releaser.is_alive():
            releaser.join()
        app.state.engine.dispose()


def queued(engine: Engine, chat_ids: list[str]) -> list[str]:
    """Those of these chats whose queued mark is set."""
    with engine.connect() as connection:
        return sorted(
            str(chat)
            for (chat,) in connection.execute(
                text(
                    "SELECT chat_id FROM copilot_chat_sync_state "
                    "WHERE chat_id = ANY(CAST(:ids AS uuid[])) AND queued_since IS NOT NULL"
                ),
                {"ids": chat_ids},
            )
        )


def mark_queued(engine: Engine, chat_id: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE copilot_chat_sync_state SET queued_since = now() WHERE chat_id = :c"),
            {"c": chat_id},
        )


def test_shutdown_with_a_hung_broker_ends_within_its_bounds_and_releases_every_dropped_job(
    broker: RedisServer,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    # Timeouts far beyond the drain bound: only the bound can end the shutdown in time.
    settings = Settings(
        redis_url=broker.url,
        publish_drain_seconds=0.5,
        publish_connect_timeout_seconds=30,
        publish_socket_timeout_seconds=30,
    )
    app = create_app(settings)
    publisher = app.state.publisher
    before = dropped("shutdown")
    client = TestClient(app)
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        client.__enter__()
        try:
            chats = [new_chat(client, auth) for _ in range(3)]
            for chat in chats:
                append(client, auth, chat)
            assert publisher.pending() == 3  # one batch hangs in its send, two wait behind it
            assert queued(engine, chats) == sorted(chats)
        finally:
            started = time.monotonic()
            client.__exit__(None, None, None)
            took = time.monotonic() - started
        assert took < settings.publish_drain_seconds + RELEASE_SECONDS + 1.0, (
            f"shutdown took {took:.1f}s"
        )
        assert dropped("shutdown") - before == 3
        assert publisher.pending() == 0
        # Released: their chats' next writes send syncs again; still behind for the sweep.
        assert queued(engine, chats) == []
        assert behind(engine, chats) == sorted(chats)
        # A job handed over after the shutdown is dropped, counted and released too.
        mark_queued(engine, chats[0])
        publisher.submit([Job(SYNC_CHAT, (chats[0], 1), chats[0])])
        assert dropped("shutdown") - before == 4
        wait_until(lambda: queued(engine, chats) == [], timeout=10)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        app.state.engine.dispose()


def test_every_job_not_sent_at_shutdown_is_released_and_counted_once() -> None:
    released: list[str] = []
    gate = Gate(lambda jobs: [ConnectionError("broker went away")] * len(jobs))
    background = BackgroundPublisher(
        gate, release=released.extend, buffer_size=2, batch_size=1, drain_seconds=0.3
    )
    shutdown, full = dropped("shutdown"), dropped("buffer_full")
    try:
        background.submit([Job(SYNC_CHAT, ("chat-a", 1), "chat-a")])
        wait_until(gate.entered.is_set, timeout=10)  # chat-a's batch hangs in its send
        background.submit([Job(SYNC_CHAT, ("chat-b", 1), "chat-b")])
        background.submit([Job(SYNC_CHAT, ("chat-c", 1), "chat-c")])
        background.submit([Job(SYNC_CHAT, ("chat-d", 1), "chat-d")])  # the buffer is full
        assert dropped("buffer_full") - full == 1
        closing = threading.Thread(target=background.close)
        closing.start()
        wait_until(lambda: background.closing, timeout=10)
        background.submit([Job(SYNC_CHAT, ("chat-e", 1), "chat-e")])  # while closing
        closing.join(30)
        assert not closing.is_alive()
        assert sorted(released) == ["chat-a", "chat-b", "chat-c", "chat-d", "chat-e"]
        background.submit([Job(SYNC_CHAT, ("chat-f", 1), "chat-f")])  # after closing
        wait_until(lambda: "chat-f" in released, timeout=10)
        assert dropped("shutdown") - shutdown == 5  # a, b, c at the close; e and f submitted
        # The abandoned send returns at last, failed: its job is neither released nor counted
        # a second time.
        failures = metrics.ENQUEUE_FAILURES.labels(SYNC_CHAT)._value.get()
        gate.released.set()
        wait_until(lambda: gate.batches, timeout=10)
        time.sleep(0.2)
        assert sorted(released) == [f"chat-{c}" for c in "abcdef"]
        assert metrics.ENQUEUE_FAILURES.labels(SYNC_CHAT)._value.get() == failures
        assert dropped("shutdown") - shutdown == 5 and dropped("buffer_full") - full == 1
    finally:
        gate.released.set()


def test_an_api_process_stopped_while_its_broker_hangs_releases_its_jobs_marks(
    broker: RedisServer,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    drain = 0.5
    api = ApiProcess(
        {
            **os.environ,
            "REDIS_URL": broker.url,
            "PUBLISH_DRAIN_SECONDS": str(drain),
            "PUBLISH_CONNECT_TIMEOUT_SECONDS": "30",
            "PUBLISH_SOCKET_TIMEOUT_SECONDS": "30",
        },
        LOG_DIR / f"api-shutdown-{RUN_ID}.log",
    ).start()
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=api.base, headers=auth(), timeout=10) as client:
            chats = []
            for _ in range(3):
                created = client.post("/chats", json={})
                assert created.status_code == 201, created.text
                chats.append(created.json()["id"])
                appended = client.post(f"/chats/{chats[-1]}/messages", json={"message": message()})
                assert appended.status_code == 201, appended.text
        assert queued(engine, chats) == sorted(chats)
        started = time.monotonic()
        os.killpg(api.pid, signal.SIGTERM)
        code = api.wait(timeout=drain + RELEASE_SECONDS + 10)
        took = time.monotonic() - started
    finally:
        api.kill()
        os.kill(broker.pid, signal.SIGCONT)
    # uvicorn exits by the signal it stopped for, once its shutdown is complete.
    assert code in (0, -signal.SIGTERM), api.log()
    assert took < drain + RELEASE_SECONDS + 3.0, f"the API took {took:.1f}s to stop"
    assert queued(engine, chats) == [], api.log()
    assert behind(engine, chats) == sorted(chats)  # recorded: the sweep repairs them


def test_jobs_buffered_during_a_send_go_out_in_batches(memory_publisher: MemoryPublisher) -> None:
    bounded, sent, _ = memory_publisher
    gate = Gate(bounded.many)
    background = BackgroundPublisher(gate, buffer_size=100, batch_size=25, drain_seconds=5)
    try:
        background.submit([Job(SYNC_MESSAGES, ("chat-first", ["m"], 1), "chat-first")])
        wait_until(gate.entered.is_set, timeout=10)
        for n in range(40):  # one job per request, as the handlers hand them over
            background.submit([Job(SYNC_MESSAGES, (f"chat-{n}", ["m"], 1), f"chat-{n}")])
        gate.released.set()
        wait_until(lambda: background.pending() == 0, timeout=10)
    finally:
        gate.released.set()
        background.close()
    assert [len(batch) for batch in gate.batches] == [1, 25, 15]
    assert [args[0] for _, args in sent] == ["chat-first", *(f"chat-{n}" for n in range(40))]


def test_a_failing_broker_is_counted_per_job_and_logged_once_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = threading.Event()
    down.set()

    def send(jobs: Sequence[Job]) -> list[Exception | None]:
        if down.is_set():
            raise ConnectionError("broker down")
        return [None] * len(jobs)

    background = BackgroundPublisher(send, buffer_size=100, batch_size=10, drain_seconds=5)
    failures = metrics.ENQUEUE_FAILURES.labels(SYNC_CHAT)
    sent = metrics.ENQUEUED.labels(SYNC_CHAT)
    failed_before, sent_before = failures._value.get(), sent._value.get()
    try:
        with caplog.at_level(logging.WARNING, "app.publisher"):
            for n in range(30):
                background.submit([Job(SYNC_CHAT, (f"chat-{n}", 1))])
                wait_until(lambda: background.pending() == 0, timeout=10)
            assert failures._value.get() - failed_before == 30
            down.clear()
            background.submit([Job(SYNC_CHAT, ("chat-up", 1))])
            wait_until(lambda: sent._value.get() - sent_before == 1, timeout=10)
    finally:
        background.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "not sent" in m]) == 1
    assert [m for m in messages if "sending again" in m] == [
        "publish: sending again; 30 jobs had failed"
    ]
