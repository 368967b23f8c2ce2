"""Fixtures: a database of this run's own built by `alembic upgrade head`, a Redis database of its
own, a real Celery worker process, and an API client that publishes to that Redis."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.support import ROOT, WorkerProcess, wait_converged

RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"
ADMIN_DSN = os.environ.get("TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = f"cdw_test_{RUN_ID}"
REDIS_HOST = "redis://127.0.0.1:6379"
REDIS_DB = 1 + (os.getpid() % 15)

# Set before anything imports the settings: the app, the worker and alembic all read these.
os.environ.update(
    DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}",
    REDIS_URL=f"{REDIS_HOST}/{REDIS_DB}",
    AUTH_SECRET="test-secret-" + secrets.token_hex(32),
    DUALWRITE_PHASE="dual_write",
)

LOG_DIR = ROOT / ".run" / "test-logs"


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
        [str(Path(os.sys.executable).parent / "alembic"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr + result.stdout


def pytest_sessionstart(session: pytest.Session) -> None:
    check = subprocess.run([str(ROOT / "scripts" / "services.sh")], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.exit(check.stdout.strip(), returncode=3)
    create_database(DB_NAME)
    alembic(os.environ["DATABASE_URL"], "upgrade", "head")
    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    drop_database(DB_NAME)
    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()


@pytest.fixture(scope="session")
def settings():  # type: ignore[no-untyped-def]
    from app.settings import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def engine(settings):  # type: ignore[no-untyped-def]
    from app.db import make_engine

    engine = make_engine(settings, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessionmaker(engine):  # type: ignore[no-untyped-def]
    from app.db import make_sessionmaker

    return make_sessionmaker(engine)


@pytest.fixture(scope="session")
def worker() -> Iterator[WorkerProcess]:
    """One real worker process for the session (prefork, two children)."""
    process = WorkerProcess(
        dict(os.environ), LOG_DIR / f"worker-{RUN_ID}.log", f"test-{RUN_ID}", "-c", "2"
    ).start()
    yield process
    process.stop()


@pytest.fixture()
def clean(engine) -> None:  # type: ignore[no-untyped-def]
    """Empty tables; for tests that look at every chat rather than their own."""
    from sqlalchemy import text

    with engine.begin() as connection:
        connection.execute(text("TRUNCATE copilot_chats CASCADE"))


@pytest.fixture(scope="session")
def api(settings):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture()
def auth(settings):  # type: ignore[no-untyped-def]
    from app.auth import issue_token

    def headers(user: str = "alice", admin: bool = False) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {issue_token(settings.signing_secret, user, admin=admin)}"
        }

    return headers


@pytest.fixture()
def converged(engine, worker):  # type: ignore[no-untyped-def]
    """`converged(*chat_ids)` waits for the worker to bring those chats in line with the JSONB."""

    def wait(*chat_ids: object, timeout: float = 30.0) -> None:
        wait_converged(engine, [str(c) for c in chat_ids], timeout=timeout)

    return wait
