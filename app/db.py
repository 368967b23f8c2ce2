"""Engines and sessions. Every connection runs in UTC; worker connections also carry timeouts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings


def make_engine(settings: Settings, *, worker: bool = False, pool_size: int = 5) -> Engine:
    """An engine for the API (`worker=False`) or for Celery workers and operator commands.

    Worker connections get statement, lock and idle-in-transaction timeouts so that a sync
    blocked on a lock or a lost client fails fast and is retried, instead of hanging a worker.
    """
    options = [
        "-c timezone=UTC",
        f"-c application_name=chat-dualwrite-{'worker' if worker else 'api'}",
    ]
    if worker:
        options += [
            f"-c statement_timeout={settings.worker_statement_timeout_ms}",
            f"-c lock_timeout={settings.worker_lock_timeout_ms}",
            # Converging a batch of chats sorts and hashes their elements: keep that in memory.
            f"-c work_mem={settings.worker_work_mem}",
            "-c idle_in_transaction_session_timeout="
            f"{settings.worker_idle_in_transaction_timeout_ms}",
        ]
    return create_engine(
        settings.database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # The API checks a pooled connection before use; a worker does not (a round trip per
        # task), since a dead connection is a transient error that its retry policy handles.
        pool_pre_ping=not worker,
        connect_args={"options": " ".join(options), "connect_timeout": 5},
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False, autoflush=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error. Only boundaries use this."""
    with factory() as session, session.begin():
        yield session
