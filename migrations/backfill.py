"""The backfill of `copilot_chat_messages`: online, in keyset batches, resumable.

It runs after the expand DDL has committed, so the version trigger already records every write
to a chat. Each batch is its own transaction: it takes the same per-chat locks as a live sync,
copies its chats' elements, seeds their sync state, and moves the cursor, all or nothing. A
killed run therefore resumes at the cursor and copies nothing twice.

Only the chats that existed when the backfill started are its work. A chat created later, or
written while the backfill runs, has its sync state recorded by the trigger, and the sweep copies
it: a busy product cannot keep the backfill from finishing, and no write is missed. That is also
why a batch seeds a chat as copied only when nothing recorded a write to it first.

The batch adapts to a time budget: it grows while batches finish well inside it, and halves,
with a longer pause, when one overruns it, so a loaded database slows the copy, not the product.

Element rules (the live sync in `app/repositories/messages.py` applies the same ones, so that
the table is a pure function of the JSONB):

- an element that is not an object, or whose `id` is not a non-empty string of at most 1,024
  bytes (a longer one could not be indexed), is skipped and counted;
- where an id repeats, the first occurrence wins and `seq` is its 0-based position in the array;
- `stream_id` is the element's `streamId` when that is a string of at most 1,024 bytes (it is
  indexed), else null;
- `created_at` is the element's `timestamp`, or the chat's `created_at` when that is missing or
  unparseable; `content` is the whole element;
- a chat whose `messages` is not an array contributes nothing, and is counted.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from psycopg import errors as pg_errors
from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.exc import DBAPIError

from app.repositories import backfill as backfill_sql
from migrations.online import backoff, is_retryable, short_transaction

log = logging.getLogger("alembic.runtime.migration")

NAME = "copilot_chat_messages"
# The advisory lock class of per-chat syncs (`app.repositories.sync_state.SYNC_LOCK_CLASS`).
SYNC_LOCK_CLASS = backfill_sql.SYNC_LOCK_CLASS
MAX_FAILURES = 20

STATE_TABLE = """
CREATE TABLE IF NOT EXISTS dualwrite_backfill (
    name text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    cursor uuid,
    total_chats bigint NOT NULL,
    chats_done bigint NOT NULL DEFAULT 0,
    rows_copied bigint NOT NULL DEFAULT 0,
    bad_elements bigint NOT NULL DEFAULT 0,
    bad_chats bigint NOT NULL DEFAULT 0
)
"""

# The element rules and the copy, shared with the chunks of a fleet backfill.
_ELEMENTS = backfill_sql.ELEMENTS
_COPY = backfill_sql.COPY

# The whole copy in one statement: what the backfill does, without batches. A reference for
# benchmarks only: run by a migration, it would hold its locks for the whole copy.
INLINE = f"""
    WITH kinds AS (SELECT id, jsonb_typeof(messages) = 'array' AS is_array FROM copilot_chats),
    elems AS ({_ELEMENTS})
    {_COPY}
"""

_NEXT_IDS = text(
    """
    SELECT c.id FROM copilot_chats c
    WHERE (CAST(:after AS uuid) IS NULL OR c.id > :after)
      AND (c.created_at <= :started_at
           OR NOT EXISTS (SELECT 1 FROM copilot_chat_sync_state s WHERE s.chat_id = c.id))
    ORDER BY c.id
    LIMIT :limit
    """
)

# The same per-chat locks as a live sync, in the same order: a sync of a chat and its batch
# never interleave. Advisory locks only: the application never waits for them (row locks on the
# chats, even FOR KEY SHARE, would hold up a `SELECT ... FOR UPDATE` of the previous release for
# the whole batch). A chat deleted meanwhile fails the batch's foreign key; the batch is then
# retried, and finds it gone.
_LOCK = backfill_sql.LOCK

_BATCH = text(
    f"""
    WITH kinds AS MATERIALIZED (
        SELECT id, jsonb_typeof(messages) = 'array' AS is_array
        FROM copilot_chats WHERE id = ANY(:ids)
    ),
    elems AS ({_ELEMENTS}),
    copied AS ({_COPY} RETURNING 1),
    seeded AS (
        -- A chat the trigger saw written since the backfill started keeps what it recorded
        -- (it is behind, and the sweep converges it); any other chat is in sync now.
        INSERT INTO copilot_chat_sync_state AS s
            (chat_id, wanted_version, applied_version, synced_at)
        SELECT c.id, c.messages_version, c.messages_version, now()
        FROM copilot_chats c WHERE c.id = ANY(:ids)
        ORDER BY c.id
        ON CONFLICT (chat_id) DO UPDATE
            SET wanted_version = greatest(s.wanted_version, EXCLUDED.wanted_version)
        RETURNING 1
    ),
    totals AS (
        SELECT (SELECT count(*) FROM copied) AS copied,
               (SELECT count(*) FROM seeded) AS seeded,
               (SELECT count(*) FROM elems WHERE NOT valid) AS bad_elements,
               (SELECT count(*) FROM kinds WHERE NOT is_array) AS bad_chats
    )
    UPDATE dualwrite_backfill b SET
        cursor = :last,
        chats_done = b.chats_done + :batch,
        rows_copied = b.rows_copied + t.copied,
        bad_elements = b.bad_elements + t.bad_elements,
        bad_chats = b.bad_chats + t.bad_chats
    FROM totals t
    WHERE b.name = :name
    RETURNING t.copied, t.seeded
    """
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))


@dataclass(frozen=True, slots=True)
class Config:
    batch_size: int = 200
    max_batch_size: int = 1000
    batch_seconds: float = 2.0
    pause_seconds: float = 0.02
    lock_timeout_ms: int = 2000
    log_interval_seconds: float = 5.0


@dataclass(slots=True)
class State:
    started_at: datetime
    finished_at: datetime | None
    cursor: uuid.UUID | None
    total_chats: int
    chats_done: int
    rows_copied: int
    bad_elements: int
    bad_chats: int


def _state(connection: Connection) -> State | None:
    row = connection.execute(
        text(
            "SELECT started_at, finished_at, cursor, total_chats, chats_done, rows_copied, "
            "bad_elements, bad_chats FROM dualwrite_backfill WHERE name = :name"
        ),
        {"name": NAME},
    ).one_or_none()
    return State(*row) if row else None


def _start(engine: Engine) -> State:
    """The backfill's state: resumed if a run was interrupted, else started now."""
    with engine.begin() as connection:
        state = _state(connection)
        if state is not None:
            return state
        # `clock_timestamp()`: the trigger exists (its DDL committed before this), so every
        # chat created from here on has its sync state recorded and is not the backfill's work.
        connection.execute(
            text(
                "INSERT INTO dualwrite_backfill (name, started_at, total_chats) "
                "SELECT :name, clock_timestamp(), count(*) FROM copilot_chats "
                "ON CONFLICT (name) DO NOTHING"
            ),
            {"name": NAME},
        )
        state = _state(connection)
        assert state is not None
        return state


def start(engine: Engine) -> None:
    """Record the backfill's start (its work: the chats that exist now) without copying."""
    state = _start(engine)
    log.info(
        "backfill: recorded %d chats to copy (BACKFILL_ON_WORKERS: the workers copy them)",
        state.total_chats,
    )


def _run_batch(engine: Engine, state: State, size: int, lock_timeout_ms: int) -> tuple[int, int]:
    """Copy the next `size` chats; returns (chats, rows). Zero chats: the backfill is done."""
    with short_transaction(engine, lock_timeout_ms) as connection:
        ids = list(
            connection.execute(
                _NEXT_IDS,
                {"after": state.cursor, "started_at": state.started_at, "limit": size},
            ).scalars()
        )
        if not ids:
            connection.execute(
                text("UPDATE dualwrite_backfill SET finished_at = now() WHERE name = :name"),
                {"name": NAME},
            )
            return 0, 0
        connection.execute(_LOCK, {"cls": SYNC_LOCK_CLASS, "ids": ids})
        copied, _ = connection.execute(
            _BATCH, {"ids": ids, "last": ids[-1], "batch": len(ids), "name": NAME}
        ).one()
    state.cursor = ids[-1]
    state.chats_done += len(ids)
    state.rows_copied += int(copied)
    return len(ids), int(copied)


def _progress(state: State, rate: float, *, final: bool = False) -> None:
    done, total = state.chats_done, max(state.total_chats, state.chats_done)
    if final:
        log.info(
            "backfill: done: %d chats; copied %d messages; skipped %d bad elements and %d chats "
            "whose messages is not an array",
            done,
            state.rows_copied,
            state.bad_elements,
            state.bad_chats,
        )
        return
    eta = (total - done) / rate if rate > 0 else float("inf")
    log.info(
        "backfill: %d/%d chats (%.1f%%), %d rows, %.0f chats/s, ETA %s",
        done,
        total,
        100.0 * done / total if total else 100.0,
        state.rows_copied,
        rate,
        f"{eta:.0f}s" if eta != float("inf") else "unknown",
    )


def run(engine: Engine, config: Config, *, pause: Callable[[float], None] = time.sleep) -> State:
    """Copy every chat that existed when the backfill started; resume an interrupted run."""
    state = _start(engine)
    if state.finished_at is not None:
        log.info("backfill: already finished at %s; nothing to copy", state.finished_at)
        return state
    if state.chats_done:
        log.info(
            "backfill: resuming after %d of %d chats (%d rows copied so far)",
            state.chats_done,
            state.total_chats,
            state.rows_copied,
        )
    size = config.batch_size
    wait = config.pause_seconds
    failures = 0
    started = time.perf_counter()
    done_at_start = state.chats_done
    last_log = started
    while True:
        batch_started = time.perf_counter()
        try:
            chats, _ = _run_batch(engine, state, size, config.lock_timeout_ms)
        except DBAPIError as error:
            failures += 1
            deleted = isinstance(error.orig, pg_errors.ForeignKeyViolation)
            if not (is_retryable(error) or deleted) or failures > MAX_FAILURES:
                raise
            size = max(1, size // 2)
            delay = backoff(failures)
            log.warning(
                "backfill: batch gave up (%s); retrying with %d chats in %.1fs",
                type(error.orig).__name__,
                size,
                delay,
            )
            pause(delay)
            continue
        failures = 0
        if chats == 0:
            break
        elapsed = time.perf_counter() - batch_started
        if elapsed > config.batch_seconds:
            # Overran the budget: the database is busy or the chats are large. Back off.
            size = max(1, size // 2)
            wait = min(max(wait * 2, 0.05), 10 * config.batch_seconds)
        else:
            if elapsed < config.batch_seconds / 2:
                size = min(config.max_batch_size, size * 2)
            wait = config.pause_seconds
        now = time.perf_counter()
        if now - last_log >= config.log_interval_seconds:
            _progress(state, (state.chats_done - done_at_start) / (now - started))
            last_log = now
        if wait:
            pause(wait)
    with engine.connect() as connection:
        final = _state(connection)
    assert final is not None
    _progress(final, 0.0, final=True)
    return final
