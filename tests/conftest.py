"""Fixtures: a database of this run's own built by `alembic upgrade head`, a Redis database of its
own, a real Celery worker process, and an API client that publishes to that Redis."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.settings import Settings
from harness.processes import RedisServer as RedisServer
from harness.processes import WorkerProcess
from harness.processes import free_port as free_port
from harness.rabbit import RabbitVhost
from tests.support import (
    ROOT,
    AuthHeaders,
    SessionFactory,
    SetPhase,
    WaitConverged,
    wait_converged,
)

RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"
ADMIN_DSN = os.environ.get("TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = f"cdw_test_{RUN_ID}"
REDIS_HOST = "redis://127.0.0.1:6379"
# Each run claims a Redis database number of its own (see `claim_redis_db`).
REDIS_CLAIM = "cdw-test:redis-db-claim:{number}"

# Set before anything imports the settings: the app, the worker and alembic all read these.
os.environ.update(
    DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}",
    AUTH_SECRET="test-secret-" + secrets.token_hex(32),
    DUALWRITE_PHASE="dual_write",
    # Tests look at the gauges right after changing what they count.
    METRICS_CACHE_SECONDS="0",
)

LOG_DIR = ROOT / ".run" / "test-logs"
REDIS_DB = pytest.StashKey[int]()


def admin_execute(sql: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as connection:
        connection.execute(sql)


def create_database(name: str) -> str:
    admin_execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic(url: str, *args: str) -> str:
    """Run the alembic CLI, as an operator would, against `url`."""
    env = {**os.environ, "DATABASE_URL": url}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr + result.stdout


def claim_redis_db() -> int:
    """A database number no other run on this machine holds: claimed with `SET NX` in database
    0, so two runs can never flush or consume each other's keys. Claims expire after a day."""
    claims = redis.Redis.from_url(f"{REDIS_HOST}/0")
    for number in range(1, 16):
        if claims.set(REDIS_CLAIM.format(number=number), RUN_ID, nx=True, ex=86_400):
            return number
    raise RuntimeError("every Redis database 1-15 is claimed by another test run")


def release_redis_db(number: int) -> None:
    claims = redis.Redis.from_url(f"{REDIS_HOST}/0")
    key = REDIS_CLAIM.format(number=number)
    if claims.get(key) == RUN_ID.encode():
        claims.delete(key)


def pytest_sessionstart(session: pytest.Session) -> None:
    check = subprocess.run([str(ROOT / "scripts" / "services.sh")], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.exit(check.stdout.strip(), returncode=3)
    number = claim_redis_db()
    session.config.stash[REDIS_DB] = number
    # Before collection, so before anything reads the settings.
    os.environ["REDIS_URL"] = f"{REDIS_HOST}/{number}"
    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    create_database(DB_NAME)
    alembic(os.environ["DATABASE_URL"], "upgrade", "head")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    drop_database(DB_NAME)
    # A vhost left by a test that could not delete its own (every one is deleted at its end).
    for vhost in list(RABBIT_VHOSTS):
        vhost.stop()
    number = session.config.stash.get(REDIS_DB, None)
    if number is not None:
        redis.Redis.from_url(f"{REDIS_HOST}/{number}").flushdb()
        release_redis_db(number)


@pytest.fixture(scope="session")
def settings() -> Settings:
    from app.settings import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    from app.db import make_engine

    engine = make_engine(settings, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessionmaker(engine: Engine) -> SessionFactory:
    from app.db import make_sessionmaker

    return make_sessionmaker(engine)


@pytest.fixture()
def set_phase(engine: Engine) -> Iterator[SetPhase]:
    """`set_phase(name)` puts the database in a rollout phase, as `phase set --force` would,
    without catching up; the phase goes back to `dual_write` after the test."""
    from sqlalchemy import text

    def put(phase: str) -> None:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE dualwrite_phase SET phase = :p, since = now() - interval '1 day', "
                    "pending = NULL, pending_since = NULL"
                ),
                {"p": phase},
            )

    yield put
    put("dual_write")


@pytest.fixture(scope="session")
def worker() -> Iterator[WorkerProcess]:
    """One real worker process for the session (prefork, two children)."""
    process = WorkerProcess(
        dict(os.environ), LOG_DIR / f"worker-{RUN_ID}.log", f"test-{RUN_ID}", "-c", "2"
    ).start()
    yield process
    process.stop()


@pytest.fixture()
def clean(engine: Engine) -> None:
    """Empty tables; for tests that look at every chat rather than their own."""
    from sqlalchemy import text

    with engine.begin() as connection:
        connection.execute(text("TRUNCATE copilot_chats CASCADE"))


@pytest.fixture(scope="session")
def api(settings: Settings) -> Iterator[TestClient]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture()
def auth(settings: Settings) -> AuthHeaders:
    from app.auth import issue_token

    def headers(user: str = "alice", admin: bool = False) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {issue_token(settings.signing_secret, user, admin=admin)}"
        }

    return headers


@pytest.fixture()
def converged(engine: Engine, worker: WorkerProcess) -> WaitConverged:
    """`converged(*chat_ids)` waits for the worker to bring those chats in line with the JSONB."""

    def wait(*chat_ids: object, timeout: float = 30.0) -> None:
        wait_converged(engine, [str(c) for c in chat_ids], timeout=timeout)

    return wait


# ---------------------------------------------------------------------------------------------
# A broker and a worker of a test's own, for tests that stop, pause or fill the broker, or kill
# the worker: nothing they do touches the session's Redis or worker.

MAX_REDELIVERIES = 2
MAX_RETRIES = 3


@pytest.fixture()
def hooks(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture()
def broker() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


Broker = RedisServer | RabbitVhost
RABBIT_VHOSTS: set[RabbitVhost] = set()


def broker_environ(broker: Broker) -> dict[str, str]:
    """This process's environment with `broker` as the broker. On RabbitMQ without `REDIS_URL`:
    nothing of the service is to connect to Redis there."""
    environ = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")}
    return {**environ, **broker.broker_env()}


def broker_settings(broker: Broker, **overrides: object):  # type: ignore[no-untyped-def]
    """Settings of this process with `broker` as the broker (and no Redis with RabbitMQ)."""
    from app.settings import Settings

    if broker.kind == "amqp":
        return Settings(broker_url=broker.url, redis_url=None, **overrides)  # type: ignore[arg-type]
    return Settings(redis_url=broker.url, **overrides)  # type: ignore[arg-type]


@pytest.fixture()
def rabbit() -> Iterator[RabbitVhost]:
    """A RabbitMQ vhost of the test's own, deleted after it (TESTING.md #14)."""
    vhost = RabbitVhost(f"test-{RUN_ID}").start()
    RABBIT_VHOSTS.add(vhost)
    try:
        yield vhost
    finally:
        vhost.stop()
        RABBIT_VHOSTS.discard(vhost)


@pytest.fixture()
def fault_broker(request: pytest.FixtureRequest) -> Broker:
    """The broker of a test's own: a redis-server (`broker`), or with
    `@pytest.mark.parametrize("fault_broker", ["redis", "amqp"], indirect=True)` a RabbitMQ
    vhost too."""
    kind = getattr(request, "param", "redis")
    if kind == "amqp":
        vhost: RabbitVhost = request.getfixturevalue("rabbit")
        return vhost
    server: RedisServer = request.getfixturevalue("broker")
    return server


def start_worker(broker: Broker, hooks: Path, name: str, **env: str) -> WorkerProcess:
    return WorkerProcess(
        {
            **broker_environ(broker),
            "DUALWRITE_TEST_HOOKS": str(hooks),
            "MAX_REDELIVERIES": str(MAX_REDELIVERIES),
            "RETRY_MAX_RETRIES": str(MAX_RETRIES),
            "RETRY_BACKOFF_BASE_SECONDS": "0.2",
            "RETRY_BACKOFF_MAX_SECONDS": "1",
            "SWEEP_GRACE_SECONDS": "0",
            # One chat per sync: a fault test follows the chats it broke, and no other sync
            # repairs them behind its back (batching has tests of its own).
            "SYNC_BATCH_EXTRA": "0",
            **env,
        },
        LOG_DIR / f"{name}-{RUN_ID}.log",
        f"{name}-{RUN_ID}",
        "--include",
        "tests.worker_hooks",
        "-c",
        "2",
    ).start()


@pytest.fixture()
def fault_worker(fault_broker: Broker, hooks: Path) -> Iterator[WorkerProcess]:
    worker = start_worker(fault_broker, hooks, "fault")
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture()
def fault_api(fault_broker: Broker) -> Iterator[TestClient]:
    """An API client whose publishes go to the test's own broker."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(broker_settings(fault_broker))) as client:
        yield client
