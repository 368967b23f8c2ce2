"""`GET /metrics`, `GET /healthz` and `GET /readyz`: what the API, the workers (through Redis)
and the database say, after real requests, real syncs and a real reconcile."""

from __future__ import annotations

import itertools
import math
import os
import random
import socket
import string
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, event, text

from app.db import transaction
from app.jobs import Job
from app.main import create_app
from app.metrics import WORKER_KEY
from app.repositories import chats as chats_repo
from app.repositories import dead_letters
from app.services import sync
from app.services.reconcile import reconcile
from app.settings import Settings
from harness.processes import ApiProcess
from tests.support import AuthHeaders, SessionFactory, WaitConverged, wait_until
from tests.test_handlers import message, new_chat
from tests.test_reconcile import drop_row, seed

Samples = dict[str, list[Any]]


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the sample with exactly these labels (among others), None when absent."""
    for sample in samples.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


def test_requests_are_counted_by_route_template_and_status(
    api: TestClient, auth: AuthHeaders
) -> None:
    before = scrape(api)
    chat_id = new_chat(api, auth)
    sent = message("user")
    api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
    missing = api.get(f"/chats/{uuid.uuid4()}", headers=auth())
    assert missing.status_code == 404
    assert api.get("/no/such/route").status_code == 404
    assert api.get(f"/chats/{chat_id}").status_code == 401
    after = scrape(api)

    name = "dualwrite_requests_total"
    for method, route, status in [
        ("POST", "/chats", "201"),
        ("POST", "/chats/{chat_id}/messages", "201"),
        ("GET", "/chats/{chat_id}", "404"),
        ("GET", "/chats/{chat_id}", "401"),
        ("GET", "unmatched", "404"),
    ]:
        labels = {"method": method, "route": route, "status": status}
        grew = (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)
        assert grew == 1, (labels, grew)
    routes = {s.labels["route"] for s in after[name]}
    assert not any(chat_id in route for route in routes)  # templates, not raw paths


def test_an_enqueue_that_fails_is_counted(
    api: TestClient, auth: AuthHeaders, settings: Settings
) -> None:
    def broker_down(jobs: Sequence[Job]) -> list[Exception | None]:
        raise ConnectionError("broker down")

    name, task = "dualwrite_enqueue_failures_total", "chats.sync_messages"
    before = value(scrape(api), name, task=task) or 0
    broken_app = create_app(settings, send_many=broker_down)
    try:
        with TestClient(broken_app) as broken:
            chat_id = new_chat(broken, auth)
            sent = message("user")
            response = broken.post(
                f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth()
            )
            assert response.status_code == 201, response.text  # the user never sees it
    finally:
        broken_app.state.engine.dispose()
    wait_until(lambda: value(scrape(api), name, task=task) == before + 1, timeout=10)
    assert api.delete(f"/chats/{chat_id}", headers=auth()).status_code == 204  # nothing behind


def test_worker_syncs_show_as_lag_histogram_and_task_outcomes(
    api: TestClient, auth: AuthHeaders, converged: WaitConverged
) -> None:
    before = scrape(api)
    lag_count = value(before, "dualwrite_sync_lag_seconds_count") or 0
    applied = {"task": "chats.sync_messages", "outcome": "applied"}
    applied_before = value(before, "dualwrite_tasks_total", **applied) or 0

    chat_id = new_chat(api, auth)
    for _ in range(2):
        sent = message("user")
        api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
        converged(chat_id)  # one sync per append

    def recorded() -> Samples | None:
        # The worker writes its measurements to Redis after its commit: poll.
        now = scrape(api)
        lag_grew = (value(now, "dualwrite_sync_lag_seconds_count") or 0) >= lag_count + 2
        tasks_grew = (value(now, "dualwrite_tasks_total", **applied) or 0) >= applied_before + 2
        return now if lag_grew and tasks_grew else None

    after = wait_until(recorded, timeout=30, interval=0.2)
    buckets = [(float(s.labels["le"]), s.value) for s in after["dualwrite_sync_lag_seconds_bucket"]]
    assert [le for le, _ in buckets] == sorted(le for le, _ in buckets)
    assert buckets[-1][0] == math.inf
    assert all(a <= b for (_, a), (_, b) in itertools.pairwise(buckets))
    count = value(after, "dualwrite_sync_lag_seconds_count")
    assert buckets[-1][1] == count
    lag_sum = value(after, "dualwrite_sync_lag_seconds_sum")
    assert lag_sum is not None and lag_sum >= 0
    assert value(after, "dualwrite_rows_written_total", kind="inserted")


def test_database_gauges_show_backlog_dead_letters_and_the_last_reconcile(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    sessionmaker: SessionFactory,
    converged: WaitConverged,
    clean: None,
) -> None:
    chats = seed(api, auth, 1, size=3)
    (drifted,) = chats
    converged(drifted)
    drop_row(engine, drifted, chats[drifted][0]["id"])
    with transaction(sessionmaker) as session:  # a chat whose copy never ran: behind
        behind = chats_repo.create(
            session,
            user_id="alice",
            title=None,
            model="m",
            workflow_id=None,
            messages=[message("user"), message("assistant")],
        )
        letter = dead_letters.record(
            session,
            task="chats.sync_chat",
            chat_id=behind.id,
            args=[str(behind.id), 1],
            reason=dead_letters.Reason.FAILED,
            error="OperationalError: gave up",
            attempts=9,
        )
    try:
        with transaction(sessionmaker) as session:
            open_before = dead_letters.count_open(session)["failed"]
        first = scrape(api)
        assert value(first, "dualwrite_chats_behind") == 1
        assert value(first, "dualwrite_dead_letters_open", reason="failed") == open_before

        report = reconcile(sessionmaker)
        # 1 row dropped; the chat never copied is behind, but its failed dead letter keeps the
        # sweep off it: no sync is on its way, so its 2 rows are drift too, copied here.
        assert report is not None and (report.drift, report.behind, report.stalled) == (3, 0, 1)
        second = scrape(api)
        assert value(second, "dualwrite_last_reconcile_drift") == 3
        age = value(second, "dualwrite_last_reconcile_age_seconds")
        assert age is not None and 0 <= age < 60
        assert value(second, "dualwrite_chats_behind") == 0  # the reconcile copied it
        open_after = value(second, "dualwrite_dead_letters_open", reason="failed") or 0
        assert open_after == open_before - 1  # and closed its dead letter
    finally:
        with transaction(sessionmaker) as session:
            dead_letters.close(session, [letter])


def test_healthz_is_liveness_and_checks_no_dependency(api: TestClient) -> None:
    response = api.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_database_down_healthz_200_readyz_503_metrics_answer(settings: Settings) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = Settings(
        database_url=f"postgresql://postgres@127.0.0.1:{port}/nothing",
        auth_secret=settings.signing_secret,
    )
    app = create_app(down, send_many=lambda jobs: [None] * len(jobs))
    try:
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            response = client.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "unavailable" and body["broker"] == "ok"
            assert body["database"].startswith("down: ") and body["failed"] == ["database"]
            samples = scrape(client)  # a scrape never fails because the database is down
            assert value(samples, "dualwrite_chats_behind") is None
            assert "dualwrite_requests_total" in samples
    finally:
        app.state.engine.dispose()


def test_worker_metrics_up_says_whether_the_workers_hash_could_be_read(
    api: TestClient, settings: Settings
) -> None:
    assert value(scrape(api), "dualwrite_worker_metrics_up") == 1
    with socket.socket() as probe:  # a port where nothing listens: the broker's Redis is gone
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = create_app(
        settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"}),
        send_many=lambda jobs: [None] * len(jobs),
    )
    try:
        with TestClient(unreachable) as client:
            samples = scrape(client)  # the scrape itself still answers
            assert value(samples, "dualwrite_worker_metrics_up") == 0
            assert "dualwrite_sync_lag_seconds_count" not in samples
            assert value(samples, "dualwrite_chats_behind") is not None
    finally:
        unreachable.state.engine.dispose()


def test_the_oldest_behind_gauge_keeps_growing_while_nothing_consumes(
    api: TestClient,
    engine: Engine,
    sessionmaker: SessionFactory,
    clean: None,
) -> None:
    with transaction(sessionmaker) as session:  # two chats whose copy never ran
        stalled, parked = (
            chats_repo.create(
                session,
                user_id="alice",
                title=None,
                model="m",
                workflow_id=None,
                messages=[message("user")],
            ).id
            for _ in range(2)
        )
        letter = dead_letters.record(
            session,
            task="chats.sync_chat",
            chat_id=parked,
            args=[str(parked), 1],
            reason=dead_letters.Reason.FAILED,
            error="OperationalError: gave up",
            attempts=9,
        )
    with engine.begin() as connection:  # as if no worker had consumed for ten minutes, a day
        connection.execute(
            text(
                "UPDATE copilot_chat_sync_state SET dirty_since = now() - CASE chat_id "
                "WHEN :stalled THEN interval '10 minutes' ELSE interval '1 day' END "
                "WHERE chat_id IN (:stalled, :parked)"
            ),
            {"stalled": stalled, "parked": parked},
        )
    try:
        first = value(scrape(api), "dualwrite_oldest_behind_seconds")
        # The parked chat has its dead letter (and its own gauge); it does not count here.
        assert first is not None and 600 <= first < 3600
        # Sweeps come and go; the chat stays behind, and so does its age.
        for _ in range(2):
            with transaction(sessionmaker) as session:
                swept = sync.sweep(session, grace=timedelta(0), ttl=timedelta(minutes=2), limit=100)
            assert [b.chat_id for b in swept] == [stalled]
        second = value(scrape(api), "dualwrite_oldest_behind_seconds")
        assert second is not None and second >= first
        with transaction(sessionmaker) as session:  # the worker catches up
            sync.sync_chats(session, {stalled: 1})
        after = scrape(api)
        assert value(after, "dualwrite_oldest_behind_seconds") == 0
        assert value(after, "dualwrite_chats_behind") == 1  # the parked one
    finally:
        with transaction(sessionmaker) as session:
            dead_letters.close(session, [letter])


def test_database_gauges_are_read_once_per_cache_window(settings: Settings) -> None:
    cached = create_app(
        settings.model_copy(update={"metrics_cache_seconds": 60}),
        send_many=lambda jobs: [None] * len(jobs),
    )
    statements: list[str] = []

    def count(*args: Any) -> None:
        statement = args[2]
        statements.append(statement)

    event.listen(cached.state.engine, "before_cursor_execute", count)
    try:
        with TestClient(cached) as client:
            first = scrape(client)
            read = len(statements)
            assert read >= 1 and value(first, "dualwrite_chats_behind") is not None
            for _ in range(3):
                again = scrape(client)
                assert value(again, "dualwrite_chats_behind") == value(
                    first, "dualwrite_chats_behind"
                )
            assert len(statements) == read, statements[read:]  # no query within the window
    finally:
        cached.state.engine.dispose()


def test_a_field_of_the_worker_metrics_hash_that_is_not_a_count_is_left_out(
    api: TestClient,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = redis.Redis.from_url(settings.broker)
    bad = {
        "tasks|chats.not_a_task|applied": "not a number",
        "tasks|chats.also_not|nan": "nan",
        "rows": "3",  # no kind
        "tasks|chats.sync_chat": "1",  # no outcome
    }
    client.hset(WORKER_KEY, mapping=bad)  # type: ignore[arg-type]
    try:
        with caplog.at_level("WARNING", logger="app.metrics"):
            samples = scrape(api)
            scrape(api)
        tasks = {s.labels.get("task") for s in samples.get("dualwrite_tasks_total", [])}
        assert not tasks & {"chats.not_a_task", "chats.also_not"}
        assert all(s.labels.get("kind") for s in samples.get("dualwrite_rows_written_total", []))
        assert "dualwrite_sync_lag_seconds_count" in samples  # the rest is still there
        warned = [r.getMessage() for r in caplog.records if "worker metrics hash" in r.getMessage()]
        assert len(warned) == len(bad), warned  # once per field, not once per scrape
    finally:
        client.hdel(WORKER_KEY, *bad)


def test_random_methods_and_paths_add_no_series(tmp_path: Path) -> None:
    """Unauthenticated clients choose the method and the path of a request; the series they can
    create are those of a fixed set, however many requests they send."""
    api = ApiProcess(dict(os.environ), tmp_path / "api.log").start()
    rng = random.Random(14)

    def series() -> int:
        body = httpx.get(api.base + "/metrics", timeout=30).raise_for_status().text
        return sum(1 for line in body.splitlines() if line and not line.startswith("#"))

    def token(size: int) -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=size))

    try:
        with httpx.Client(base_url=api.base, timeout=30) as client:
            # Every route, every method it knows, and a first stranger: the set itself.
            for path in ("/chats", f"/chats/{uuid.uuid4()}", "/healthz", "/nowhere"):
                for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "X"):
                    client.request(method, path)
            before = series()
            for i in range(3000):
                method = token(rng.randint(1, 12)).upper() if i % 3 else rng.choice(["get", "Get"])
                path = rng.choice(["/chats", "/healthz", f"/{token(8)}", f"/chats/{token(5)}"])
                client.request(method, path)
            after = series()
    finally:
        api.stop()
    assert after - before <= 10, (before, after)
