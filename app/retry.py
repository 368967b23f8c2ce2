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

# query_canceled: the worker's `statement_timeout` cut a statement short. Once may be a busy
# moment; twice in a row is a chat too large to copy within the limit, and more retries only
# spend minutes of backoff (and a worker each time) on the same outcome.
QUERY_CANCELED = "57014"


def sqlstate(error: BaseException) -> str:
    """The SQLSTATE of a database error (of the DBAPI error SQLAlchemy wraps), else ""."""
    return getattr(getattr(error, "orig", error), "sqlstate", None) or ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int
    backoff_base: float
    backoff_max: float
    jitter: bool
    # The worker's `statement_timeout`, named in the dead letter of a chat that keeps hitting it.
    statement_timeout_ms: int = 60_000

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_retries=settings.retry_max_retries,
            backoff_base=settings.retry_backoff_base_seconds,
            backoff_max=settings.retry_backoff_max_seconds,
            jitter=settings.retry_jitter,
            statement_timeout_ms=settings.worker_statement_timeout_ms,
        )

    def is_transient(self, error: BaseException) -> bool:
        if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
            return True
        if sqlstate(error).startswith(PERMANENT_SQLSTATE_CLASSES):
            return False
        return isinstance(error, TRANSIENT)

    def timed_out_again(self, error: BaseException, retries_done: int) -> bool:
        """A statement timeout on a retry: the previous attempt failed the same way, or on some
        other transient error; either way the chat gets no more tries."""
        return retries_done >= 1 and sqlstate(error) == QUERY_CANCELED

    def should_retry(self, error: BaseException, retries_done: int) -> bool:
        if self.timed_out_again(error, retries_done):
            return False
        return self.is_transient(error) and retries_done < self.max_retries

    def describe(self, error: BaseException, retries_done: int) -> str:
        """What the dead letter of an error that is not retried says."""
        if self.timed_out_again(error, retries_done):
            cause = getattr(error, "orig", None) or error
            return (
                f"statement timeout again on retry {retries_done}: the chat is too large for "
                f"WORKER_STATEMENT_TIMEOUT_MS={self.statement_timeout_ms}; raise it for the "
                f"workers, then replay ({type(cause).__name__}: {str(cause).strip()})"
            )
        return f"{type(error).__name__}: {error}"

    def countdown(self, retries_done: int) -> float:
        """Exponential backoff capped at `backoff_max`, with full jitter when enabled."""
        delay = min(self.backoff_max, self.backoff_base * (2**retries_done))
        return random.uniform(0, delay) if self.jitter else delay
