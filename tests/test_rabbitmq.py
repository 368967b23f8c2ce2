"""RabbitMQ as the broker, against faults: a proxy in front of the machine's RabbitMQ that stops
forwarding (a hung broker: connections stay open, nothing answers) or closes (down). The real
server is never stopped; every test has a vhost of its own."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from app import broker as app_broker
from app.jobs import JobQueue, publish_after_commit
from app.settings import Settings
from app.task_names import SYNC_CHAT
from harness.processes import ApiProcess, wait_until
from harness.rabbit import RabbitVhost, TcpProxy, rabbitmqctl
from tests.conftest import LOG_DIR, RUN_ID
from tests.support import SessionFactory


@pytest.fixture()
def proxy(rabbit: RabbitVhost) -> Iterator[TcpProxy]:
    running = TcpProxy().start()
    try:
        yield running
    finally:
        running.close()


def settings_through(rabbit: RabbitVhost, proxy: TcpProxy) -> Settings:
    return Settings(broker_url=rabbit.url_on(proxy.port), redis_url=None)


def publish_bound(settings: Settings) -> float:
    """What one send may wait for at most: each try connects and waits for its confirm."""
    tries = settings.publish_max_retries + 1
    each = settings.publish_connect_timeout_seconds + settings.publish_socket_timeout_seconds
    return tries * each + settings.publish_max_retries * settings.publish_retry_interval_seconds


def send_one(publisher: app_broker.BoundedPublisher) -> tuple[int, float]:
    queue = JobQueue()
    queue.enqueue(SYNC_CHAT, "00000000-0000-0000-0000-000000000001", 1)
    started = time.perf_counter()
    failed = publish_after_commit(queue, publisher)
    return failed, time.perf_counter() - started


def test_a_publish_to_a_hung_rabbitmq_gives_up_within_its_bound_and_recovers(
    rabbit: RabbitVhost, proxy: TcpProxy
) -> None:
    settings = settings_through(rabbit, proxy)
    publisher = app_broker.bounded_publisher(settings)
    assert send_one(publisher)[0] == 0  # the pooled connection is open and confirmed sends
    bound = publish_bound(settings)

    proxy.hang()
    try:
        # On the open connection (the confirm never comes), then on new ones (the handshake
        # never ends): each send gives up within the bound.
        outcomes = [send_one(publisher) for _ in range(3)]
    finally:
        proxy.resume()
    assert [failed for failed, _ in outcomes] == [1, 1, 1]
    slowest = max(took for _, took in outcomes)
    assert slowest < bound + 0.5, f"a send took {slowest:.2f}s, bound {bound:.2f}s"

    # Once RabbitMQ answers again, the next send goes out, confirmed.
    assert wait_until(lambda: send_one(publisher)[0] == 0, timeout=10)
    depths = app_broker.queue_lengths(Settings(broker_url=rabbit.url, redis_url=None))
    assert depths.waiting["dualwrite.sync"] >= 2


def test_a_publish_that_rabbitmq_refuses_is_a_failure_not_a_loss(rabbit: RabbitVhost) -> None:
    """Publisher confirms: a message RabbitMQ nacks (here: its queue is full and rejects
    publishes) fails the send, so its chat is released for the sweep; every send reported as
    sent is in the queue."""
    settings = Settings(broker_url=rabbit.url, redis_url=None)
    # A policy applies on top of the arguments the queue is declared with: two messages at most.
    rabbitmqctl(
        "set_policy", "-p", rabbit.name, "--apply-to", "queues", "full", "^dualwrite\\.sync$",
        '{"max-length": 2, "overflow": "reject-publish"}',
    )  # fmt: skip
    publisher = app_broker.bounded_publisher(settings)
    outcomes = []
    for _ in range(10):
        outcomes.append(send_one(publisher)[0])
        time.sleep(0.2)  # a quorum queue tells its publishers it is full asynchronously
    sent = outcomes.count(0)
    assert 1 <= sent < 10 and outcomes[-1] == 1, outcomes
    wait_until(lambda: rabbit.queues()["dualwrite.sync"]["messages"] == sent, 30)


def not_ready(api: ApiProcess, bound: float) -> dict[str, Any] | None:
    started = time.monotonic()
    response = httpx.get(api.base + "/readyz", timeout=10)
    took = time.monotonic() - started
    assert took < bound, f"/readyz took {took:.2f}s"
    body: dict[str, Any] | None = response.json() if response.status_code == 503 else None
    return body


def test_readyz_names_a_hung_or_down_rabbitmq_within_its_bound(
    rabbit: RabbitVhost, proxy: TcpProxy
) -> None:
    bound = Settings.model_fields["ready_timeout_seconds"].default + 1.5
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["BROKER_URL"] = rabbit.url_on(proxy.port)
    api = ApiProcess(env, LOG_DIR / f"api-ready-rabbit-{RUN_ID}.log").start()
    try:
        ready = wait_until(
            lambda: (r := httpx.get(api.base + "/readyz", timeout=10)).status_code == 200 and r,
            30,
        )
        assert ready.json()["broker"] == "ok"
        proxy.hang()
        try:
            body = wait_until(lambda: not_ready(api, bound), 10, what="/readyz to see it hung")
            assert body["failed"] == ["broker"]
            assert body["database"] == "ok" and body["phase"] == "ok"
        finally:
            proxy.resume()
        wait_until(lambda: httpx.get(api.base + "/readyz", timeout=10).status_code == 200, 20)
        proxy.close()  # down: nothing listens any more
        body = wait_until(lambda: not_ready(api, bound), 10, what="/readyz to see it down")
        assert body["failed"] == ["broker"] and body["broker"].startswith("down: ")
    finally:
        api.stop()


def test_a_message_past_the_delivery_limit_ends_in_the_database_dead_letters(
    rabbit: RabbitVhost, hooks: Path, engine: Engine, sessionmaker: SessionFactory
) -> None:
    """A consumer that loses the message every time (here: rejects it back to the queue) makes
    RabbitMQ dead-letter it after `DELIVERY_LIMIT` returns; the worker's periodic task moves it
    from the dead-letter queue into the dead letters, where `status` and replay see it."""
    from kombu.connection import Connection

    from app import topology
    from app.broker import producer
    from app.db import transaction
    from app.repositories import chats as chats_repo
    from app.task_names import COLLECT_DEAD_LETTERS
    from tests.conftest import start_worker
    from tests.test_faults import dead_letters_of
    from tests.test_handlers import message

    settings = Settings(broker_url=rabbit.url, redis_url=None)
    with transaction(sessionmaker) as session:
        chat = chats_repo.create(
            session, user_id="u", title=None, model="m", workflow_id=None, messages=[message()]
        )
    with Connection(rabbit.url) as connection:  # type: ignore[no-untyped-call]
        channel = connection.default_channel
        for queue in [*topology.task_queues(settings), topology.dead_letter_queue()]:
            queue.bind(channel).declare()  # type: ignore[no-untyped-call]
        producer(settings).send_task("chats.sync_chat", args=(str(chat.id), 1))
        sync_queue = topology.task_queues(settings)[0].bind(channel)  # type: ignore[no-untyped-call]
        returns = 0
        while (taken := sync_queue.get(no_ack=False)) is not None:
            taken.reject(requeue=True)
            returns += 1
            assert returns <= topology.DELIVERY_LIMIT + 1
    assert returns == topology.DELIVERY_LIMIT + 1
    depths = app_broker.queue_lengths(settings)
    assert depths.waiting["dualwrite.sync"] == 0 and depths.dead == 1

    worker = start_worker(rabbit, hooks, "collect")
    try:
        producer(settings).send_task(COLLECT_DEAD_LETTERS)
        found = wait_until(lambda: dead_letters_of(engine, str(chat.id)), timeout=30)
    finally:
        worker.stop()
    assert found == [("worker_lost", topology.DELIVERY_LIMIT + 1)]
    assert app_broker.queue_lengths(settings).dead == 0


def test_status_shows_rabbitmqs_queues_consumers_and_workers_without_redis(
    rabbit: RabbitVhost, hooks: Path
) -> None:
    import re
    import subprocess
    import sys

    from tests.conftest import broker_environ, start_worker
    from tests.support import ROOT

    worker = start_worker(rabbit, hooks, "status")
    try:
        env = broker_environ(rabbit)
        assert "REDIS_URL" not in env
        result = subprocess.run(
            [sys.executable, "-m", "app", "status"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"^queues: dualwrite\.sync 0 waiting \(1 consumers\), dualwrite\.maintenance 0 waiting "
        r"\(1 consumers\); 0 dead-lettered by the broker$",
        result.stdout,
        re.MULTILINE,
    ), result.stdout
    assert re.search(rf"^workers seen: 1 \({worker.name}@", result.stdout, re.MULTILINE)


def test_the_rollout_page_shows_rabbitmqs_queues_without_redis(
    rabbit: RabbitVhost,
) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from app.main import create_app
    from tests.test_ops import OPS, basic

    settings = Settings(
        broker_url=rabbit.url, redis_url=None, ops_basic_auth=SecretStr(":".join(OPS))
    )
    with TestClient(create_app(settings)) as client:
        page = client.get("/ops/", headers=basic(*OPS))
        metrics = client.get("/metrics").text
    assert page.status_code == 200, page.text
    # No worker has declared the queues yet: they count as empty, with no consumer.
    assert (
        "queues: dualwrite.sync 0 waiting (0 consumers), dualwrite.maintenance 0 waiting "
        "(0 consumers); 0 dead-lettered by the broker" in page.text
    )
    # The lag comes from the worker nodes' own /metrics, whatever the broker.
    assert "set OPS_WORKER_METRICS_URLS to add them up here" in page.text
    assert "dualwrite_queue_messages" in metrics and "dualwrite_tasks_total" not in metrics
