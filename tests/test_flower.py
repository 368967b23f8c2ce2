"""Flower, started as an operator starts it (`celery -A tasks flower`), against this run's Redis:
its own HTTP API, behind basic auth, lists the worker and the sync tasks that ran."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from app.task_names import SYNC_CHAT
from harness.processes import RedisServer, WorkerProcess
from tasks.publish import producer
from tests.conftest import start_worker
from tests.support import ROOT, AuthHeaders, wait_until
from tests.test_handlers import message, new_chat

LOG_DIR = ROOT / ".run" / "test-logs"
AUTH = ("operator", "s3cret-pass")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_flower(env: dict[str, str]) -> Iterator[str]:
    """Flower as an operator starts it, with `env`; its base URL. Stopped as a process group."""
    port = free_port()
    env = {k: v for k, v in env.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"flower-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
            ],
            cwd=ROOT,
            # As scripts/run.sh and the compose file give it: not on the command line.
            env={**env, "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, log_path.read_text(errors="replace")
        try:
            return httpx.get(f"{base}/api/workers", auth=AUTH, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout=60, interval=0.2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)


@pytest.fixture(scope="module")
def flower(worker: WorkerProcess) -> Iterator[str]:
    """Flower's base URL; started only once the worker is ready (it caches the workers it saw
    at start-up)."""
    with running_flower(dict(os.environ)) as base:
        yield base


def succeeded(flower: str, task_id: str) -> Any:
    """The task as Flower lists it once it succeeded, else None."""
    response = httpx.get(f"{flower}/api/task/info/{task_id}", auth=AUTH, timeout=30)
    if response.status_code != 200:
        return None
    task = response.json()
    return task if task.get("state") == "SUCCESS" else None


def test_flower_lists_the_worker_and_a_sync_task_that_ran(
    flower: str, worker: WorkerProcess, api: TestClient, auth: AuthHeaders
) -> None:
    def workers() -> dict[str, Any]:
        response = httpx.get(f"{flower}/api/workers?refresh=1", auth=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        return {k: v for k, v in response.json().items() if k.startswith(f"{worker.name}@")}

    seen = wait_until(workers, timeout=30, interval=0.5)
    (info,) = seen.values()
    queues = {q["name"] for q in info.get("active_queues", [])}
    assert {"dualwrite.sync", "dualwrite.maintenance"} <= queues
    assert "chats.sync_messages" in info.get("registered", [])

    # Flower sees tasks through events; one sent before its receiver connected is missed, so a
    # fresh append is made until one shows up.
    chat_id = new_chat(api, auth)
    deadline = time.monotonic() + 60
    found: dict[str, Any] | None = None
    while found is None:
        assert time.monotonic() < deadline, "no chats.sync_messages task for this chat in Flower"
        sent = message("user")
        response = api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
        assert response.status_code == 201, response.text
        version = response.json()["messages_version"]

        def listed(message_id: str = str(sent["id"]), version: int = version) -> Any:
            response = httpx.get(
                f"{flower}/api/tasks",
                params={"taskname": "chats.sync_messages"},
                auth=AUTH,
                timeout=30,
            )
            assert response.status_code == 200, response.text
            for task in response.json().values():
                args = task.get("args") or ""
                if chat_id in args and message_id in args and task.get("state") == "SUCCESS":
                    return task
            return None

        try:
            found = wait_until(listed, timeout=5, interval=0.2)
        except AssertionError:
            continue
    assert found["name"] == "chats.sync_messages"
    assert found["worker"].startswith(f"{worker.name}@")
    assert str(version) in found["args"]  # chat id, message ids and version: enough to find it


def test_flower_api_needs_the_password(flower: str) -> None:
    for path in ("/api/workers", "/api/tasks"):
        assert httpx.get(f"{flower}{path}", timeout=10).status_code == 401
        wrong = httpx.get(f"{flower}{path}", auth=(AUTH[0], "nope"), timeout=10)
        assert wrong.status_code == 401


def test_a_worker_without_task_events_sends_them_while_flower_runs(
    broker: RedisServer, hooks: Path
) -> None:
    """`WORKER_TASK_EVENTS=false`: no event costs the worker while nobody watches, and Flower,
    once it runs, turns them on and lists the tasks."""
    worker = start_worker(broker, hooks, "quiet", WORKER_TASK_EVENTS="false")
    sender = producer(Settings(redis_url=broker.url))
    try:
        with running_flower({**os.environ, "REDIS_URL": broker.url}) as base:
            # Tasks sent before Flower turned the events on are not listed: send until one is.
            def listed() -> Any:
                task_id = sender.send_task(SYNC_CHAT, args=[str(uuid.uuid4()), 1]).id
                return wait_until(lambda: succeeded(base, task_id), timeout=3, interval=0.2)

            deadline = time.monotonic() + 60
            while True:
                try:
                    found = listed()
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "Flower never listed a task"
            assert found["worker"].startswith(f"{worker.name}@")
        assert "task events: OFF" in worker.log()  # as started
        assert "Events of group {task} enabled by remote." in worker.log()  # by Flower
    finally:
        worker.stop()


def test_a_worker_sends_the_task_events_of_a_moment_in_one_publish(
    broker: RedisServer, hooks: Path
) -> None:
    """The events of one task (received, started, succeeded) reach an event receiver, as
    Flower is one, in a single message of the broker: one publish per moment, not per event."""
    from celery.events.event import get_exchange
    from kombu.entity import Queue

    from tasks import celery

    worker = start_worker(broker, hooks, "batched", WORKER_TASK_EVENTS_FLUSH_SECONDS="0.5")
    sender = producer(Settings(redis_url=broker.url))
    bodies: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        bodies.append(body)

    try:
        with celery.connection_for_read(broker.url) as connection:
            queue = Queue(  # type: ignore[no-untyped-call]
                f"test-events-{uuid.uuid4().hex}",
                get_exchange(connection),
                routing_key="#",
                auto_delete=True,
                durable=False,
            )
            with connection.Consumer(queue, callbacks=[on_message]):
                task_id = sender.send_task(SYNC_CHAT, args=[str(uuid.uuid4()), 1]).id

                def events_of_the_task() -> list[list[str]]:
                    with suppress(TimeoutError):
                        connection.drain_events(timeout=0.2)
                    return [
                        [e["type"] for e in (b if isinstance(b, list) else [b])]
                        for b in bodies
                        if any(
                            e.get("uuid") == task_id for e in (b if isinstance(b, list) else [b])
                        )
                    ]

                wait_until(
                    lambda: any("task-succeeded" in types for types in events_of_the_task()),
                    timeout=30,
                    interval=0.05,
                    what="the task's events",
                )
        messages = events_of_the_task()
        assert len(messages) == 1, messages
        assert {"task-received", "task-started", "task-succeeded"} <= set(messages[0])
    finally:
        worker.stop()
