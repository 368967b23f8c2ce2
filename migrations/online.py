"""DDL that never blocks the application for more than a moment.

A DDL statement on a busy table first waits for its lock, and while it waits every later
statement on that table (plain reads included) queues behind it. So each step runs in a short
transaction of its own under `lock_timeout`: if the lock is not granted in time, the step gives
up (releasing the queue), waits with backoff and tries again. Nothing slow runs inside a step.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from alembic import op
from psycopg import errors as pg_errors
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from app.settings import Settings

log = logging.getLogger("alembic.runtime.migration")

# Errors after which the same step may succeed: the lock was not granted in time, or the
# transaction lost a deadlock or a serialization race with the application.
RETRYABLE = (
    pg_errors.LockNotAvailable,
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
)


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, DBAPIError) and isinstance(error.orig, RETRYABLE)


def backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Capped exponential backoff with jitter, so that retries do not march in step."""
    delay: float = min(cap, base * (2**attempt))
    return delay / 2 + random.uniform(0, delay / 2)


@contextmanager
def short_transaction(engine: Engine, lock_timeout_ms: int) -> Iterator[Connection]:
    """A transaction whose lock waits end after `lock_timeout_ms`."""
    with engine.begin() as connection:
        connection.execute(text(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}"))
        yield connection


def retry_on_lock(
    step: str,
    run: Callable[[], None],
    *,
    attempts: int,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run `run` until it gets through; between tries, back off. Gives up after `attempts`."""
    for attempt in range(attempts):
        try:
            run()
            return
        except DBAPIError as error:
            if not is_retryable(error) or attempt + 1 >= attempts:
                raise
            delay = backoff(attempt)
            log.warning(
                "%s: %s (try %d of %d); retrying in %.1fs",
                step,
                type(error.orig).__name__,
                attempt + 1,
                attempts,
                delay,
            )
            sleep(delay)


def run_ddl(
    engine: Engine,
    step: str,
    statements: Sequence[str],
    *,
    lock_timeout_ms: int,
    attempts: int,
) -> None:
    """Run `statements` in one short transaction under `lock_timeout`, retried while the lock
    is not granted. Every statement must be idempotent, so a rerun after a kill is harmless."""

    def once() -> None:
        started = time.perf_counter()
        with short_transaction(engine, lock_timeout_ms) as connection:
            for statement in statements:
                connection.execute(text(statement))
        log.info("%s: done in %.0f ms", step, (time.perf_counter() - started) * 1000)

    retry_on_lock(step, once, attempts=attempts)


@contextmanager
def revision_steps() -> Iterator[Callable[..., None]]:
    """Inside an alembic revision: `step(name, *statements)` runs `run_ddl` with the settings'
    `MIGRATION_LOCK_TIMEOUT_MS` and `MIGRATION_LOCK_ATTEMPTS`, out of alembic's transaction, so
    that each step commits on its own, no lock outlives its step, and a rerun resumes."""
    settings = Settings()
    with op.get_context().autocommit_block():
        engine = op.get_bind().engine

        def step(name: str, *statements: str) -> None:
            run_ddl(
                engine,
                name,
                statements,
                lock_timeout_ms=settings.migration_lock_timeout_ms,
                attempts=settings.migration_lock_attempts,
            )

        yield step
