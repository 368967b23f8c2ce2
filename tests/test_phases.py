"""Rollout phases: what handlers enqueue, and where pages of a transcript are read from."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app import metrics
from app.db import transaction
from app.main import create_app
from app.services import sync
from app.settings import Phase, Settings
from harness.processes import WorkerProcess
from tests.conftest import RedisServer, start_worker
from tests.support import (
    AuthHeaders,
    SessionFactory,
    SetPhase,
    assert_converged,
    wait_converged,
    wait_until,
)
from tests.test_handlers import message


@pytest.fixture()
def phase_api(
    request: pytest.FixtureRequest, broker: RedisServer, set_phase: SetPhase
) -> Iterator[TestClient]:
    """An API on the test's own broker, with the database in the phase `request.param`."""
    set_phase(request.param.value)
    with TestClient(create_app(Settings(redis_url=broker.url))) as client:
        yield client


def shadow(outcome: str) -> float:
    return float(metrics.SHADOW_READS.labels(outcome)._value.get())


@pytest.mark.parametrize("phase_api", [Phase.JSONB_ONLY], indirect=True)
def test_jsonb_only_enqueues_nothing_and_the_sweep_catches_up_later(
    phase_api: TestClient,
    broker: RedisServer,
    hooks: Path,
    auth: AuthHeaders,
    engine: Engine,
    set_phase: SetPhase,
) -> None:
    chat = phase_api.post("/chats", json={}, headers=auth()).json()["id"]
    for _ in range(3):
        response = phase_api.post(
            f"/chats/{chat}/messages", json={"message": message()}, headers=auth()
        )
        assert response.status_code == 201
    assert broker.client().llen("dualwrite.sync") == 0
    with engine.connect() as connection:
        behind = connection.execute(
            text(
                "SELECT wanted_version - applied_version FROM copilot_chat_sync_state "
                "WHERE chat_id = :id"
            ),
            {"id": chat},
        ).scalar_one()
    assert behind == 3  # recorded, so that turning dual_write on repairs it

    worker = start_worker(broker, hooks, "phases")
    try:
        from tasks.publish import producer

        sender = producer(Settings(redis_url=broker.url))
        sender.send_task("chats.sweep")  # in jsonb_only the sweep sends nothing
        wait_until(lambda: "sweep" in worker.log() and "succeeded" in worker.log())
        assert broker.client().llen("dualwrite.sync") == 0
        set_phase("dual_write")
        sender.send_task("chats.sweep")
        wait_converged(engine, [chat])
    finally:
        worker.stop()


@pytest.mark.parametrize("phase_api", [Phase.VERIFY_READS], indirect=True)
def test_verify_reads_serves_jsonb_and_counts_mismatches(
    phase_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    fault_worker: WorkerProcess,
) -> None:
    chat = phase_api.post("/chats", json={}, headers=auth()).json()["id"]
    sent = [message(), message("assistant"), message()]
    phase_api.put(f"/chats/{chat}/messages", json={"messages": sent}, headers=auth())
    wait_converged(engine, [chat])

    matches = shadow("match")
    page = phase_api.get(f"/chats/{chat}/messages?limit=2", headers=auth()).json()
    assert page["source"] == "jsonb" and [m["id"] for m in page["messages"]] == [
        sent[1]["id"],
        sent[2]["id"],
    ]
    assert shadow("match") - matches == 1

    with engine.begin() as connection:  # drift made by hand
        connection.execute(
            text(
                'UPDATE copilot_chat_messages SET content = content || \'{"content": "tampered"}\' '
                "WHERE chat_id = :id AND message_id = :mid"
            ),
            {"id": chat, "mid": sent[2]["id"]},
        )
    mismatches = shadow("mismatch")
    phase_api.get(f"/chats/{chat}/messages?limit=2", headers=auth())
    assert shadow("mismatch") - mismatches == 1


@pytest.mark.parametrize("phase_api", [Phase.READ_TABLE], indirect=True)
def test_read_table_serves_the_table_and_falls_back_when_behind(
    phase_api: TestClient,
    broker: RedisServer,
    auth: AuthHeaders,
    engine: Engine,
    hooks: Path,
) -> None:
    chat = phase_api.post("/chats", json={}, headers=auth()).json()["id"]
    sent = [message(), message("assistant")]
    phase_api.put(f"/chats/{chat}/messages", json={"messages": sent}, headers=auth())
    # No worker yet: the copy is behind, so the JSONB answers.
    behind = phase_api.get(f"/chats/{chat}/messages", headers=auth()).json()
    assert behind["source"] == "jsonb" and len(behind["messages"]) == 2

    worker = start_worker(broker, hooks, "read-table")
    try:
        wait_converged(engine, [chat])
    finally:
        worker.stop()
    served = phase_api.get(f"/chats/{chat}/messages", headers=auth()).json()
    assert served["source"] == "table"
    assert served["messages"] == sent and served["seqs"] == [0, 1]


@pytest.mark.parametrize("phase_api", [Phase.VERIFY_READS], indirect=True)
def test_shadow_reads_apply_the_tables_mapping_to_repeated_and_over_long_ids(
    phase_api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
) -> None:
    first, other = message(), message("assistant")
    repeated = {**first, "content": "the same id again, other content"}
    too_long = message(id="x" * 1025)
    legacy = [first, other, repeated, too_long, repeated, message()]
    with engine.begin() as connection:  # the API refuses duplicates: a legacy chat, in SQL
        chat = connection.execute(
            text(
                "INSERT INTO copilot_chats (user_id, model, messages) "
                "VALUES ('alice', 'm', CAST(:messages AS jsonb)) RETURNING id"
            ),
            {"messages": json.dumps(legacy)},
        ).scalar_one()
    with transaction(sessionmaker) as session:
        sync.resync(session, [chat])
    assert_converged(engine, [chat])

    matches, mismatches = shadow("match"), shadow("mismatch")
    # Every page: the whole chat; the repeat inside the page; the repeat whose first occurrence
    # lies on an earlier page; the over-long id alone.
    for query in ("limit=6", "limit=3", "limit=2&before_seq=3", "limit=1&before_seq=4"):
        page = phase_api.get(f"/chats/{chat}/messages?{query}", headers=auth())
        assert page.status_code == 200 and page.json()["source"] == "jsonb", page.text
    assert (shadow("match") - matches, shadow("mismatch") - mismatches) == (4, 0)

    # Drift made by hand: the id's row holds its repeat (the last occurrence won, not the
    # first). The page of the first occurrence finds its row missing.
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE copilot_chat_messages SET seq = 4, content = CAST(:repeat AS jsonb) "
                "WHERE chat_id = :id AND message_id = :mid"
            ),
            {"id": chat, "mid": first["id"], "repeat": json.dumps(repeated)},
        )
    phase_api.get(f"/chats/{chat}/messages?limit=1&before_seq=1", headers=auth())
    assert shadow("mismatch") - mismatches == 1
