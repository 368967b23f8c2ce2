"""Engines and sessions. Every connection runs in UTC and carries statement, lock and
idle-in-transaction timeouts (the API's and the workers' own)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings


def make_engine(
    settings: Settings,
    *,
    worker: bool = False,
    pool_size: int | None = None,
    max_overflow: int | None = None,
) -> Engine:
    """An engine for the API (`worker=False`) or for Celery workers and operator commands.

    Worker connections get statement, lock and idle-in-transaction timeouts so that a sync
    blocked on a lock or a lost client fails fast and is retried, instead of hanging a worker.
    API connections get tighter ones of their own, and the API's pool gives up on a wait after
    `api_pool_timeout_seconds`: a request never holds a pooled connection, or waits for one,
    for long (the caller answers 503 with `Retry-After`). A `pool_size` given without
    `max_overflow` allows as many extra connections again.
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
        size, overflow, pool_timeout = pool_size or 5, pool_size or 5, 30.0
    else:
        options += [
            f"-c statement_timeout={settings.api_statement_timeout_ms}",
            f"-c lock_timeout={settings.api_lock_timeout_ms}",
            f"-c idle_in_transaction_session_timeout={settings.api_idle_in_transaction_timeout_ms}",
        ]
        size = pool_size or settings.api_pool_size
        overflow = pool_size or settings.api_pool_max_overflow
        pool_timeout = settings.api_pool_timeout_seconds
    return create_engine(
        settings.database_url,
        pool_size=size,
        max_overflow=overflow if max_overflow is None else max_overflow,
        pool_timeout=pool_timeout,
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


# SQLSTATEs of a connection that is gone: class 08 (connection exception), and the server ending
# the session (57P01 admin_shutdown: pg_terminate_backend or a fast shutdown; 57P02
# crash_shutdown; 57P03 cannot_connect_now; 57P05 idle_session_timeout).
_GONE = ("08", "57P01", "57P02", "57P03", "57P05")


def connection_lost(error: BaseException) -> bool:
    """Whether a database error means the connection died (so its transaction is gone), rather
    than a statement failing on a live one."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    state = getattr(getattr(error, "orig", None), "sqlstate", None) or ""
    return isinstance(error, DBAPIError) and state.startswith(_GONE)
