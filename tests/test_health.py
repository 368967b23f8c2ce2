"""`GET /healthz` (liveness) and `GET /readyz` (readiness) with real PostgreSQL, a Redis of the
test's own and real API processes; and the compose file's healthchecks, run as compose runs them,
against a real worker, beat and Flower."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.main import create_app
from app.settings import Settings
from harness.processes import ApiProcess, Process, RedisServer, free_port, wait_until
from tests.conftest import DB_NAME, LOG_DIR, RUN_ID, create_database, drop_database
from tests.support import ROOT
from tests.test_compose import (
    SERVICES,
    STATE_DIRS,
    celery_service,
    command,
    environment,
    healthcheck,
    option,
    seconds,
)

# `/readyz` answers within READY_TIMEOUT_SECONDS (0.8 by default) whatever hangs; the rest is
# slack for a shared 2-core machine.
READY_BOUND = Settings.model_fields["ready_timeout_seconds"].default + 1.5
VENV_BIN = str(Path(sys.executable).parent)


def timed_get(base: str, path: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.get(base + path, timeout=10)
    return response, time.monotonic() - started


def unused_database_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


# ---------------------------------------------------------------------------------------------
# /healthz and /readyz


def test_readyz_is_200_when_the_database_the_phase_and_the_broker_answer(api: TestClient) -> None:
    response = api.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "phase": "ok",
        "broker": "ok",
        "failed": [],
    }
    assert api.get("/healthz").json() == {"status": "ok"}


def test_readyz_names_the_broker_when_it_is_paused_or_stopped_within_its_bound(
    broker: RedisServer,
) -> None:
    env = {**os.environ, "REDIS_URL": broker.url}
    api = ApiProcess(env, LOG_DIR / f"api-ready-broker-{RUN_ID}.log").start()
    try:
        wait_until(lambda: timed_get(api.base, "/readyz")[0].status_code == 200, 30)
        os.kill(broker.pid, signal.SIGSTOP)  # hung: connections are accepted, nothing answers
        try:

            def not_ready() -> dict[str, Any] | None:
                response, took = timed_get(api.base, "/readyz")
                assert took < READY_BOUND, f"/readyz took {took:.2f}s with the broker hung"
                return response.json() if response.status_code == 503 else None

            body = wait_until(not_ready, 10, what="/readyz to see the hung broker")
            assert body["failed"] == ["broker"]
            assert body["database"] == "ok" and body["phase"] == "ok"
            response, took = timed_get(api.base, "/healthz")
            assert response.status_code == 200 and took < READY_BOUND
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        wait_until(lambda: timed_get(api.base, "/readyz")[0].status_code == 200, 10)

        broker.stop()  # down: nothing listens any more
        body = wait_until(not_ready, 10, what="/readyz to see the broker down")
        assert body["failed"] == ["broker"]
        assert body["broker"].startswith("down: ")
        assert timed_get(api.base, "/healthz")[0].status_code == 200
    finally:
        api.stop()


def test_readyz_names_the_database_when_it_is_unreachable_while_healthz_stays_200() -> None:
    env = {**os.environ, "DATABASE_URL": unused_database_url()}
    # Started once `/healthz` answers: liveness needs no database.
    api = ApiProcess(env, LOG_DIR / f"api-ready-database-{RUN_ID}.log").start(timeout=30)
    try:
        response, took = timed_get(api.base, "/readyz")
        assert response.status_code == 503, response.text
        assert took < READY_BOUND
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["failed"] == ["database"]
        assert body["database"].startswith("down: ")
        assert body["phase"] == "not checked" and body["broker"] == "ok"
        assert "postgres" not in response.text  # no URL, no user name
        assert timed_get(api.base, "/healthz")[0].status_code == 200
        assert httpx.get(api.base + "/metrics", timeout=10).status_code == 200
    finally:
        api.stop()


def test_readyz_names_the_phase_when_the_migration_has_not_run(settings: Settings) -> None:
    name = f"{DB_NAME}_unmigrated"
    url = create_database(name)
    app = create_app(
        Settings(database_url=url, auth_secret=settings.signing_secret),
        send_many=lambda jobs: [None] * len(jobs),
    )
    try:
        with TestClient(app) as client:
            response = client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["failed"] == ["phase"]
        assert body["database"] == "ok" and body["phase"].startswith("unreadable: ")
    finally:
        app.state.engine.dispose()
        drop_database(name)


def test_a_storm_of_probes_reads_the_database_once_per_cache_period(settings: Settings) -> None:
    app = create_app(
        Settings(auth_secret=settings.signing_secret, ready_cache_seconds=60),
        send_many=lambda jobs: [None] * len(jobs),
    )
    phase_reads = []

    @event.listens_for(app.state.ready_engine, "before_cursor_execute")
    def count(*args: Any) -> None:
        statement = args[2]
        if "dualwrite_phase" in statement:
            phase_reads.append(statement)

    try:
        with TestClient(app) as client, ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: client.get("/readyz").status_code, range(64)))
        assert statuses == [200] * 64
        assert len(phase_reads) == 1  # concurrent probes shared one check, then its cache
    finally:
        app.state.engine.dispose()
        app.state.ready_engine.dispose()


def test_readyz_stays_200_while_the_api_pool_is_exhausted(settings: Settings) -> None:
    """`/readyz` checks the database on a connection of its own: a storm that holds every
    connection of the API's pool does not make the process look unready."""
    app = create_app(
        Settings(
            auth_secret=settings.signing_secret,
            api_pool_size=1,
            api_pool_max_overflow=0,
            api_pool_timeout_seconds=5,
            ready_cache_seconds=0,
        ),
        send_many=lambda jobs: [None] * len(jobs),
    )
    try:
        with TestClient(app) as client, app.state.engine.connect():  # the pool's only one
            response = client.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json()["database"] == "ok"
        assert app.state.ready_engine.pool.size() == 1
        assert app.state.ready_engine.pool._max_overflow == 0
    finally:
        app.state.engine.dispose()
        app.state.ready_engine.dispose()


# ---------------------------------------------------------------------------------------------
# The compose healthchecks, run against real processes started with the compose commands.


def shell(name: str, env: dict[str, str], replace: dict[str, str] | None = None) -> int:
    """Run the service's `CMD-SHELL` healthcheck as the container's shell would (compose turns
    `$$` into `$`), within its timeout; `replace` maps container paths to this machine's."""
    script = healthcheck(name).replace("$$", "$")
    for old, new in (replace or {}).items():
        script = script.replace(old, new)
    path = f"{VENV_BIN}:{env.get('PATH', '')}"
    limit = seconds(SERVICES[name]["healthcheck"]["timeout"])
    return subprocess.run(
        ["sh", "-c", script], env={**env, "PATH": path}, cwd=ROOT, timeout=limit
    ).returncode


def celery_argv(name: str, **options: str) -> list[str]:
    """The service's `celery ...` command for this interpreter, with some options replaced."""
    args = command(name)
    assert args[0] == "celery"
    out = []
    for arg in args[1:]:
        key = arg.split("=", 1)[0]
        out.append(f"{key}={options[key]}" if key in options else arg)
    return [sys.executable, "-m", "celery", *out]


def test_worker_healthcheck_answers_for_a_live_worker_and_fails_in_time_without_one(
    broker: RedisServer,
) -> None:
    name = celery_service("worker")
    env = {**os.environ, "REDIS_URL": broker.url, "HOSTNAME": socket.gethostname()}
    worker = Process(celery_argv(name), env, LOG_DIR / f"compose-worker-{RUN_ID}.log", " ready.")
    worker.start()
    try:
        assert shell(name, env) == 0
    finally:
        worker.stop()
    started = time.monotonic()
    assert shell(name, env) != 0
    assert time.monotonic() - started < seconds(SERVICES[name]["healthcheck"]["timeout"])


def schedule_files(directory: Path) -> list[Path]:
    return list(directory.glob("celerybeat-schedule*"))


def age(files: list[Path], seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    for path in files:
        os.utime(path, (then, then))


def test_beat_healthcheck_follows_the_schedule_file_beat_keeps_writing(
    broker: RedisServer, tmp_path: Path
) -> None:
    name = celery_service("beat")
    schedule = Path(option(command(name), "-s", "--schedule")).name
    argv = celery_argv(name, **{"--schedule": str(tmp_path / schedule)})
    # The sweep every second: beat writes its file after each job it sends.
    env = {**os.environ, "REDIS_URL": broker.url, "SWEEP_INTERVAL_SECONDS": "1"}
    beat = Process(argv, env, LOG_DIR / f"compose-beat-{RUN_ID}.log", "beat: Starting")
    paths = {STATE_DIRS["beat"]: str(tmp_path)}
    beat.start()
    try:
        wait_until(lambda: shell(name, env, paths) == 0, 20, 0.5)
        # Past beat's first sync after start (celery syncs then, and after that only every
        # three minutes unless `beat_sync_every` says otherwise).
        wait_until(lambda: beat.log().count("Sending due task") >= 3, 20, 0.2)
        age(schedule_files(tmp_path), 3600)
        # Beat brings the file up to date by itself, well within the check's -mmin.
        wait_until(lambda: shell(name, env, paths) == 0, 20, 0.5, what="beat to rewrite it")
    finally:
        beat.stop()
    age(schedule_files(tmp_path), 3600)  # a beat that stopped ticking an hour ago
    assert shell(name, env, paths) != 0


def test_flower_healthcheck_uses_flowers_credentials_and_flower_keeps_its_state(
    broker: RedisServer, tmp_path: Path
) -> None:
    name = celery_service("flower")
    flower_port = free_port()
    compose_env = environment(name)
    database = tmp_path / Path(compose_env["FLOWER_DB"]).name
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")},
        "REDIS_URL": broker.url,
        "FLOWER_BASIC_AUTH": "operator:s3cret-pass",
        "FLOWER_PERSISTENT": compose_env["FLOWER_PERSISTENT"],
        "FLOWER_DB": str(database),
        "FLOWER_STATE_SAVE_INTERVAL": compose_env["FLOWER_STATE_SAVE_INTERVAL"],
    }
    argv = [*celery_argv(name, **{"--port": str(flower_port)}), "--address=127.0.0.1"]
    base = f"http://127.0.0.1:{flower_port}"

    def answers() -> bool:
        try:
            return httpx.get(base + "/healthcheck", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    flower = Process(argv, env, LOG_DIR / f"compose-flower-{RUN_ID}.log", answers)
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    compose_port = option(command(name), "--port")
    probe = [
        sys.executable,
        *(arg.replace(f":{compose_port}/", f":{flower_port}/") for arg in test[2:]),
    ]
    limit = seconds(SERVICES[name]["healthcheck"]["timeout"])
    flower.start()
    try:
        assert subprocess.run(probe, env=env, timeout=limit).returncode == 0
        wrong = {**env, "FLOWER_BASIC_AUTH": "operator:not-the-password"}
        assert subprocess.run(probe, env=wrong, timeout=limit).returncode != 0
    finally:
        flower.stop()
    # Persistent: Flower saved its state where the volume is mounted.
    assert list(tmp_path.glob(database.name + "*")), sorted(tmp_path.iterdir())
