"""Publishing after commit: coalescing per chat, counted failures, the time bound."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis

from app import metrics
from app.jobs import SYNC_CHAT, SYNC_MESSAGES, JobQueue, publish_after_commit
from app.settings import Settings
from tasks import publish
from tests.conftest import start_worker
from tests.support import wait_converged
from tests.test_handlers import message


@pytest.fixture()
def memory_publisher(monkeypatch):  # type: ignore[no-untyped-def]
    """The real publisher over kombu's in-memory transport and a fake Redis for its markers."""
    server = fakeredis.FakeServer()
    monkeypatch.setattr(
        redis.Redis,
        "from_url",
        classmethod(lambda cls, *a, **k: fakeredis.FakeRedis(server=server)),
    )
    sent: list[tuple[str, tuple[object, ...]]] = []
    real_producer = publish.producer

    def recording_producer(settings: Settings):  # type: ignore[no-untyped-def]
        app = real_producer(settings)
        app.send_task = lambda name, args, **kw: sent.append((name, tuple(args)))  # type: ignore[method-assign]
        return app

    monkeypatch.setattr(publish, "producer", recording_producer)
    return publish.bounded_publisher(Settings(redis_url="memory://")), sent, server


def test_jobs_of_one_chat_coalesce_until_its_task_starts(memory_publisher) -> None:  # type: ignore[no-untyped-def]
    publisher, sent, server = memory_publisher
    queue = JobQueue()
    for version in (1, 2, 3):
        queue.enqueue(SYNC_MESSAGES, "chat-a", ["m"], version, coalesce_key="chat-a")
    queue.enqueue(SYNC_MESSAGES, "chat-b", ["m"], 1, coalesce_key="chat-b")
    before = metrics.COALESCED.labels(SYNC_MESSAGES)._value.get()
    assert publish_after_commit(queue, publisher) == 0
    assert sent == [(SYNC_MESSAGES, ("chat-a", ["m"], 1)), (SYNC_MESSAGES, ("chat-b", ["m"], 1))]
    assert metrics.COALESCED.labels(SYNC_MESSAGES)._value.get() - before == 2

    # The task deletes the marker when it starts; the next change sends a task again.
    fakeredis.FakeRedis(server=server).delete(publish.pending_key("chat-a"))
    queue.enqueue(SYNC_MESSAGES, "chat-a", ["m"], 4, coalesce_key="chat-a")
    publish_after_commit(queue, publisher)
    assert sent[-1] == (SYNC_MESSAGES, ("chat-a", ["m"], 4))


def test_jobs_without_a_key_are_always_sent(memory_publisher) -> None:  # type: ignore[no-untyped-def]
    publisher, sent, _ = memory_publisher
    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    publish_after_commit(queue, publisher)
    assert len(sent) == 2


def test_a_disabled_queue_records_nothing() -> None:
    queue = JobQueue(enabled=False)
    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    assert queue.jobs == []


def test_a_failing_publish_is_counted_not_raised() -> None:
    def broken(job):  # type: ignore[no-untyped-def]
        raise ConnectionError("broker down")

    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    before = metrics.ENQUEUE_FAILURES.labels(SYNC_CHAT)._value.get()
    assert publish_after_commit(queue, broken) == 1
    assert metrics.ENQUEUE_FAILURES.labels(SYNC_CHAT)._value.get() - before == 1
    assert queue.jobs == []


def test_publish_to_a_dead_port_gives_up_within_its_bound(settings) -> None:  # type: ignore[no-untyped-def]
    publisher = publish.bounded_publisher(Settings(redis_url="redis://127.0.0.1:1/0"))
    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "chat-a", 1, coalesce_key="chat-a")
    started = time.perf_counter()
    assert publish_after_commit(queue, publisher) == 1
    assert time.perf_counter() - started < 1.0


def test_appends_while_a_task_waits_send_no_new_task(
    broker, hooks, fault_api, auth, engine
) -> None:  # type: ignore[no-untyped-def,no-redef]
    # No worker yet: every task waits in the private broker's queue.
    chat = fault_api.post("/chats", json={}, headers=auth()).json()["id"]
    other = fault_api.post("/chats", json={}, headers=auth()).json()["id"]
    for _ in range(5):
        fault_api.post(f"/chats/{chat}/messages", json={"message": message()}, headers=auth())
    fault_api.post(f"/chats/{other}/messages", json={"message": message()}, headers=auth())
    assert broker.client().llen("dualwrite.sync") == 2
    worker = start_worker(broker, hooks, "coalesce")
    try:
        wait_converged(engine, [chat, other])
    finally:
        worker.stop()


def test_a_failed_send_releases_the_chat_for_the_next_change(monkeypatch, memory_publisher) -> None:  # type: ignore[no-untyped-def]
    _, _, server = memory_publisher  # its fake Redis holds the markers
    real_producer = publish.producer

    def refusing_producer(settings: Settings):  # type: ignore[no-untyped-def]
        app = real_producer(settings)

        def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise ConnectionError("broker down")

        app.send_task = refuse  # type: ignore[method-assign]
        return app

    monkeypatch.setattr(publish, "producer", refusing_producer)
    failing = publish.bounded_publisher(Settings(redis_url="memory://"))
    queue = JobQueue()
    queue.enqueue(SYNC_MESSAGES, "chat-f", ["m"], 1, coalesce_key="chat-f")
    assert publish_after_commit(queue, failing) == 1
    # The marker is gone, so the next change is sent (or fails) rather than held back.
    assert fakeredis.FakeRedis(server=server).get(publish.pending_key("chat-f")) is None
