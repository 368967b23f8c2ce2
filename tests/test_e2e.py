"""The whole path on each broker, Redis and RabbitMQ: requests through the API, published after
the commit to the broker, synced by a real worker, and what the operator sees of the broker (the
queues in `status`, `/readyz`, the worker ping). With RabbitMQ there is no Redis anywhere: the
API's settings and the worker's environment have no `REDIS_URL`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.broker import queue_lengths, workers_seen
from app.topology import DEAD_LETTER_EXCHANGE, DELIVERY_LIMIT
from harness.processes import WorkerProcess
from harness.rabbit import RabbitVhost
from tests.conftest import Broker, broker_settings
from tests.support import (
    AuthHeaders,
    SetPhase,
    chat_jsonb,
    table_rows,
    wait_converged,
    wait_until,
)
from tests.test_handlers import message, new_chat

BOTH_BROKERS = pytest.mark.parametrize("fault_broker", ["redis", "amqp"], indirect=True)


@BOTH_BROKERS
def test_every_callsite_reaches_the_table_through_the_broker(
    fault_broker: Broker,
    fault_worker: WorkerProcess,
    fault_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
) -> None:
    api = fault_api
    chat = new_chat(api, auth)
    question = message("user")
    assert api.post(f"/chats/{chat}/messages", json={"message": question}, headers=auth())
    reply = message("assistant")
    completed = api.post(
        f"/chats/{chat}/turns/{question['id']}/complete", json={"message": reply}, headers=auth()
    )
    assert completed.status_code == 201, completed.text
    pair = {"user": message("user"), "assistant": message("assistant")}
    assert api.post(f"/chats/{chat}/inbox", json=pair, headers=auth()).status_code == 201
    replaced = new_chat(api, auth)
    snapshot = [message("user"), message("assistant"), message("user")]
    put = api.put(f"/chats/{replaced}/messages", json={"messages": snapshot}, headers=auth())
    assert put.status_code == 200, put.text
    fork = api.post(
        f"/chats/{replaced}/fork", json={"up_to_message_id": snapshot[1]["id"]}, headers=auth()
    )
    assert fork.status_code == 201, fork.text
    imported = api.post(
        "/admin/chats/import",
        json={"user_id": "alice", "messages": [message("user"), message("assistant")]},
        headers=auth(admin=True),
    )
    assert imported.status_code == 201, imported.text
    chats = [chat, replaced, fork.json()["id"], imported.json()["id"]]

    wait_converged(engine, chats, timeout=60)
    live, _ = table_rows(engine, chat)
    assert sorted(live, key=lambda m: live[m].seq) == [
        question["id"],
        reply["id"],
        pair["user"]["id"],
        pair["assistant"]["id"],
    ]
    assert live[reply["id"]].stream_id == question["id"]

    settings = broker_settings(fault_broker)
    depths = wait_until(
        lambda: (d := queue_lengths(settings)).waiting.get("dualwrite.sync") == 0 and d,
        timeout=30,
    )
    assert set(depths.waiting) == {"dualwrite.sync", "dualwrite.maintenance"}
    assert any(name.startswith(f"{fault_worker.name}@") for name in workers_seen(settings))
    scraped = api.get("/metrics").text
    assert 'dualwrite_queue_messages{queue="dualwrite.sync"} 0.0' in scraped
    assert "dualwrite_broker_up 1.0" in scraped
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["broker"] == "ok"

    if isinstance(fault_broker, RabbitVhost):
        assert depths.unacked is None  # AMQP does not tell a client
        assert depths.consumers == {"dualwrite.sync": 1, "dualwrite.maintenance": 1}
        assert depths.dead == 0
        queue = fault_broker.queues()["dualwrite.sync"]
        assert queue["type"] == "quorum"
        assert f'{{"x-delivery-limit",{DELIVERY_LIMIT}}}' in queue["arguments"]
        assert f'{{"x-dead-letter-exchange","{DEAD_LETTER_EXCHANGE}"}}' in queue["arguments"]
        assert "dualwrite.dead" in fault_broker.queues()  # declared by the worker at start
        assert settings.redis is None
        # No Redis behind the worker: its start-up check of Redis's eviction policy never ran.
        assert "maxmemory-policy" not in fault_worker.log()
        assert "could not check the broker" not in fault_worker.log()
    else:
        assert depths.unacked == 0
        assert depths.consumers is None and depths.dead is None


@BOTH_BROKERS
def test_a_delayed_sync_waits_in_the_broker_not_in_the_worker(
    fault_broker: Broker,
    fault_worker: WorkerProcess,
    auth: AuthHeaders,
    engine: Engine,
    set_phase: SetPhase,
) -> None:
    """In `table_only` the JSONB follows the rows through a sync sent with a countdown
    (`REVERSE_SYNC_DELAY_SECONDS`). On RabbitMQ it waits in Celery's delay queues (quorum
    queues too), not in the worker's prefetch, which quorum queues keep static; on Redis the
    worker holds it unacked until it is due."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = broker_settings(fault_broker, reverse_sync_delay_seconds=8.0)
    with TestClient(create_app(settings)) as api:
        chat = new_chat(api, auth)
        set_phase("table_only")
        sent = message("user")
        response = api.post(f"/chats/{chat}/messages", json={"message": sent}, headers=auth())
        assert response.status_code == 201, response.text

        def waiting_in_the_broker() -> bool:
            if isinstance(fault_broker, RabbitVhost):
                queues = fault_broker.queues()
                return any(
                    q["messages"] for n, q in queues.items() if n.startswith("celery_delayed_")
                )
            return bool(fault_broker.client().hlen("unacked"))

        wait_until(waiting_in_the_broker, timeout=8, interval=0.2)

        def followed() -> bool:
            found = chat_jsonb(engine, chat)
            return found is not None and [m["id"] for m in found[0]] == [sent["id"]]

        wait_until(followed, timeout=60, interval=0.2)
    if isinstance(fault_broker, RabbitVhost):
        delayed = {n: q for n, q in fault_broker.queues().items() if n.startswith("celery_")}
        assert len(delayed) == 28 and {q["type"] for q in delayed.values()} == {"quorum"}


def _args(arguments: str) -> dict[str, str]:
    """rabbitmqctl's `[{"x-a","b"},{"x-c",1}]` as a dict, for messages in assertions."""
    pairs = arguments.strip("[]").split("},{")
    return dict(p.strip("{}").replace('"', "").split(",", 1) for p in pairs if p)


def test_rabbitmq_queues_say_what_they_are(rabbit: RabbitVhost, hooks: Path) -> None:
    """Declared by a worker, the project's queues are durable quorum queues with the delivery
    limit and the dead-letter path; nothing else but Celery's own queues is there."""
    from tests.conftest import start_worker

    worker = start_worker(rabbit, hooks, "declare")
    try:
        queues = rabbit.queues()
    finally:
        worker.stop()
    for name in ("dualwrite.sync", "dualwrite.maintenance"):
        args = _args(queues[name]["arguments"])
        assert args == {
            "x-queue-type": "quorum",
            "x-delivery-limit": str(DELIVERY_LIMIT),
            "x-dead-letter-exchange": "dualwrite.dead",
            "x-dead-letter-routing-key": "dualwrite.dead",
        }, json.dumps(args)
    assert queues["dualwrite.dead"]["type"] == "quorum"
