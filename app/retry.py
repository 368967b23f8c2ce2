"""The retry policy of sync tasks: which errors are worth another try, how often, how late."""

from __future__ import annotations

import random
from dataclasses import dataclass

import psycopg
from sqlalchemy import exc as sa_exc

from app.settings import Settings

# Errors that a later attempt can succeed after: a lost or refused connection, a serialization
# failure, a deadlock, a lock or statement timeout. psycopg files all of these under
# OperationalError (TransactionRollbackError, LockNotAvailable, QueryCanceled are subclasses).
TRANSIENT: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

# OperationalErrors that no retry can fix: program limit exceeded (an index row too large, too
# many columns...). The data has to change first.
PERMANENT_SQLSTATE_CLASSES = ("54",)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int
    backoff_base: float
    backoff_max: float
    jitter: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_retries=settings.retry_max_retries,
            backoff_base=settings.retry_backoff_base_seconds,
            backoff_max=settings.retry_backoff_max_seconds,
            jitter=settings.retry_jitter,
        )

    def is_transient(self, error: BaseException) -> bool:
        if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
            return True
        sqlstate = getattr(getattr(error, "orig", error), "sqlstate", None) or ""
        if sqlstate.startswith(PERMANENT_SQLSTATE_CLASSES):
            return False
        return isinstance(error, TRANSIENT)

    def should_retry(self, error: BaseException, retries_done: int) -> bool:
        return self.is_transient(error) and retries_done < self.max_retries

    def countdown(self, retries_done: int) -> float:
        """Exponential backoff capped at `backoff_max`, with full jitter when enabled."""
        delay = min(self.backoff_max, self.backoff_base * (2**retries_done))
        return random.uniform(0, delay) if self.jitter else delay
