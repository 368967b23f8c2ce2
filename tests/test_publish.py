"""Publishing after commit: coalescing per chat, counted failures, the time bound."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis

from app import metrics
from app.jobs import (
    SYNC_CHAT,
    SYNC_MESSAGES,
    Job,
    JobQueue,
    Published,
    publish_after_commit,
    publish_many_after_commit,
)
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


def test_a_bulk_publish_sets_all_markers_in_one_round_trip_and_sends_through_one_producer(
    memory_publisher,
) -> None:  # type: ignore[no-untyped-def]
    publisher, sent, _ = memory_publisher
    round_trips, acquired = [], []
    pipeline, acquire = publisher.markers.pipeline, publisher.app.producer_or_acquire

    def counting_pipeline(*args, **kwargs):  # type: ignore[no-untyped-def]
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute
        pipe.execute = lambda: round_trips.append(1) or execute()
        return pipe

    def counting_acquire(*args, **kwargs):  # type: ignore[no-untyped-def]
        acquired.append(1)
        return acquire(*args, **kwargs)

    publisher.markers.pipeline = counting_pipeline
    publisher.app.producer_or_acquire = counting_acquire
    jobs = [
        Job(SYNC_CHAT, ("chat-a", 1), "chat-a"),
        Job(SYNC_CHAT, ("chat-b", 1), "chat-b"),
        Job(SYNC_CHAT, ("chat-a", 2), "chat-a"),  # the same chat twice in one batch
        Job(SYNC_CHAT, ("chat-c", 1)),  # no key: always sent
    ]
    assert publisher.many(jobs) == [True, True, False, True]
    assert sent == [
        (SYNC_CHAT, ("chat-a", 1)),
        (SYNC_CHAT, ("chat-b", 1)),
        (SYNC_CHAT, ("chat-c", 1)),
    ]
    assert (len(round_trips), len(acquired)) == (1, 1)
    # Their syncs still wait: a second sweep sends nothing for the same chats.
    assert publisher.many(jobs[:2]) == [False, False]
    assert len(sent) == 3


def test_a_bulk_publish_stops_at_the_first_failed_send_and_releases_those_not_sent(
    memory_publisher,
) -> None:  # type: ignore[no-untyped-def]
    publisher, _, server = memory_publisher
    attempts: list[str] = []

    def flaky(name, args, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(args[0])
        if len(attempts) > 1:
            raise ConnectionError("broker went away")

    publisher.app.send_task = flaky
    jobs = [Job(SYNC_CHAT, (f"chat-{n}", 1), f"chat-{n}") for n in range(4)]
    outcomes = publisher.many(jobs)
    assert outcomes[0] is True
    assert all(isinstance(o, ConnectionError) for o in outcomes[1:])
    assert attempts == ["chat-0", "chat-1"]  # no timeout waited out per remaining job
    markers = fakeredis.FakeRedis(server=server)
    assert markers.get(publish.pending_key("chat-0")) is not None  # its task waits
    assert [markers.get(publish.pending_key(f"chat-{n}")) for n in (1, 2, 3)] == [None] * 3


def test_a_bulk_publish_counts_each_outcome_and_never_raises() -> None:
    queue = JobQueue()
    for chat in ("chat-a", "chat-b", "chat-c"):
        queue.enqueue(SYNC_CHAT, chat, 1, coalesce_key=chat)
    before = {
        counter: counter.labels(SYNC_CHAT)._value.get()
        for counter in (metrics.ENQUEUED, metrics.COALESCED, metrics.ENQUEUE_FAILURES)
    }
    report = publish_many_after_commit(queue, lambda jobs: [True, False, ConnectionError("x")])
    assert report == Published(sent=1, coalesced=1, failed=1)
    assert [c.labels(SYNC_CHAT)._value.get() - v for c, v in before.items()] == [1, 1, 1]
    assert queue.jobs == []

    def down(jobs):  # type: ignore[no-untyped-def]
        raise ConnectionError("broker down")

    queue.enqueue(SYNC_CHAT, "chat-a", 1)
    queue.enqueue(SYNC_CHAT, "chat-b", 1)
    assert publish_many_after_commit(queue, down) == Published(failed=2)


def test_the_sweep_reuses_one_publisher_per_process() -> None:
    first = publish.process_publisher()
    assert publish.process_publisher() is first
    assert first.app is publish.process_publisher().app
