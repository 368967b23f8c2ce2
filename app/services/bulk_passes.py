"""The bulk passes on the worker fleet: the backfill and the rolling full reconcile, as chunks
over keyset ranges of chat ids that any worker runs (`chats.backfill_chunk`,
`chats.reconcile_chunk` on the maintenance queue).

    pass (active | paused | finished | failed)
      └── chunks: lo < chat id <= hi, pending → queued → running → done (or failed)

`dispatch` queues chunks up to `BULK_MAX_CONCURRENT_CHUNKS` in flight across the whole fleet,
counted in the database under one lock; every finished chunk dispatches again, and so does beat
(`chats.dispatch_chunks`), which also takes back chunks lost with a killed worker or a lost task.
A chunk runs in batches, each one transaction that does its work and moves the chunk's cursor
and counts, so a chunk taken again resumes after its last batch and counts nothing twice. The
batch size adapts to `BACKFILL_BATCH_SECONDS` as in the migration's backfill, and a chunk yields
(back to pending, resumed by the next dispatch) after `BULK_CHUNK_SECONDS`: no task outlasts its
time limit, and a paused pass stops at its next batch.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_sessionmaker, transaction
from app.jobs import Job, UnsafePublishMany
from app.repositories import backfill as backfill_repo
from app.repositories import bulk_passes as repo
from app.repositories import bulk_paused, dead_letters, reconcile_runs
from app.repositories import phase as phase_repo
from app.repositories.bulk_passes import Chunk, Kind
from app.services import reconcile as reconcile_service
from app.settings import Phase, Settings
from app.task_names import BACKFILL_CHUNK, RECONCILE_CHUNK

log = logging.getLogger(__name__)
# What the upgrade says goes where alembic's own lines go.
migration_log = logging.getLogger("alembic.runtime.migration")

TASKS = {Kind.BACKFILL: BACKFILL_CHUNK, Kind.RECONCILE: RECONCILE_CHUNK}
# The operator's pause of each kind (`python -m app bulk pause backfill|reconcile-nightly`).
PAUSES = {
    bulk_paused.Pass.BACKFILL: Kind.BACKFILL,
    bulk_paused.Pass.RECONCILE_NIGHTLY: Kind.RECONCILE,
}


def job(chunk: Chunk) -> Job:
    """The chunk's task; its arguments show the pass and the range (Flower lists them)."""
    return Job(
        TASKS[chunk.kind],
        (
            chunk.pass_id,
            chunk.ordinal,
            str(chunk.lo) if chunk.lo else None,
            str(chunk.hi) if chunk.hi else None,
        ),
    )


def dispatch(session: Session, settings: Settings) -> list[Chunk]:
    """Take back chunks nobody works on, settle the passes, and mark queued as many chunks as
    the fleet's cap leaves room for; the caller publishes them after its commit (`publish`)."""
    repo.lock_dispatch(session)
    repo.reap(
        session,
        queued_ttl_seconds=settings.bulk_chunk_queued_ttl_seconds,
        max_attempts=settings.bulk_chunk_max_attempts,
    )
    paused = bulk_paused.paused(session)
    kinds = [kind for name, kind in PAUSES.items() if name in paused]
    for pass_id in repo.settle_passes(session, kinds):
        log.info("bulk pass #%d finished", pass_id)
    _close_backfill(session)
    free = settings.bulk_max_concurrent_chunks - repo.in_flight(session)
    return repo.queue_next(session, free)


def _close_backfill(session: Session) -> None:
    """Once a fleet backfill finished, the migration's own state says so too."""
    done = repo.progress(session, Kind.BACKFILL)
    if done is not None and done.state == "finished":
        backfill_repo.finish_state(
            session,
            chats=done.chats,
            rows=done.rows,
            bad_elements=done.bad_elements,
            bad_chats=done.bad_chats,
        )


def publish(
    factory: sessionmaker[Session],
    chunks: Sequence[Chunk],
    publish_many: UnsafePublishMany,
    say: logging.Logger = log,
) -> int:
    """Send the chunks' tasks, after the commit that queued them; a chunk whose task could not
    be sent is pending again (the next dispatch sends it). Returns how many were sent."""
    if not chunks:
        return 0
    try:
        outcomes = list(publish_many([job(c) for c in chunks]))
    except Exception as exc:  # any broker failure: the chunks wait for the next dispatch
        outcomes = [exc] * len(chunks)
    failed = [c.id for c, outcome in zip(chunks, outcomes, strict=True) if outcome is not None]
    if failed:
        first = next(o for o in outcomes if o is not None)
        say.warning("could not queue %d chunks (%s); the next dispatch does", len(failed), first)
        with transaction(factory) as session:
            repo.unqueue(session, failed)
    return len(chunks) - len(failed)


def dispatch_and_publish(
    factory: sessionmaker[Session],
    settings: Settings,
    publish_many: UnsafePublishMany,
    say: logging.Logger = log,
) -> int:
    with transaction(factory) as session:
        chunks = dispatch(session, settings)
    return publish(factory, chunks, publish_many, say)


# --- starting passes ---------------------------------------------------------------------------


def start_backfill(session: Session, settings: Settings, *, trigger: str) -> int | None:
    """Record the copy the migration left to the fleet as a pass with its chunks (resuming
    after the migration's cursor, if it had begun); None when there is nothing to copy or a
    pass is open already.

    Under the dispatch lock: the dispatch that finishes the last pass marks the copy finished
    in the same transaction, and without the lock this could read the copy unfinished before
    that commit and the pass finished after it, and start the whole copy again."""
    repo.lock_dispatch(session)
    pending = backfill_repo.pending_state(session)
    if pending is None:
        return None
    existing = repo.open_pass(session, Kind.BACKFILL)
    if existing is not None:
        return existing
    started_at, cursor = pending
    return repo.create(
        session,
        Kind.BACKFILL,
        chunk_chats=settings.bulk_chunk_chats,
        started_at=started_at,
        after=cursor,
        trigger=trigger,
    )


def start_backfill_from_migration(engine: Engine) -> None:
    """Revision 0010 with `BACKFILL_ON_WORKERS=true`: record the pass, try to queue its first
    chunks, return. A broker that does not answer costs a bounded wait: the pass is in the
    database, and beat's dispatch or `python -m app backfill resume` queues it later."""
    settings = Settings()
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        pass_id = start_backfill(session, settings, trigger="migration")
    if pass_id is None:
        return
    with transaction(factory) as session:
        progress = repo.progress(session, Kind.BACKFILL)
    assert progress is not None
    migration_log.info(
        "backfill: left to the workers (BACKFILL_ON_WORKERS): pass #%d, %d chats in %d chunks",
        pass_id,
        progress.total_chats,
        progress.total_chunks,
    )
    from app.broker import bounded_publisher

    try:
        sent = dispatch_and_publish(
            factory, settings, bounded_publisher(settings).many, say=migration_log
        )
    except Exception as exc:  # never fail the upgrade for the broker: the pass is durable
        migration_log.warning(
            "backfill: could not queue chunks now (%s); beat's dispatch will", exc
        )
        return
    migration_log.info(
        "backfill: %d chunks queued; `python -m app status` shows the progress", sent
    )


def start_night(session: Session, settings: Settings, *, trigger: str) -> tuple[int, int, int]:
    """A night of the rolling full reconcile: continue the open pass with its next share of
    chunks, or start a new pass over every chat with its first share. (pass, released, total).
    Under the dispatch lock, so that two nights at once (two beats) start one pass."""
    repo.lock_dispatch(session)
    pass_id = repo.open_pass(session, Kind.RECONCILE)
    if pass_id is not None:
        released, total = repo.release_share(session, pass_id)
        return pass_id, released, total
    pass_id = repo.create(
        session,
        Kind.RECONCILE,
        chunk_chats=settings.bulk_chunk_chats,
        nights=settings.reconcile_full_days,
        trigger=trigger,
    )
    progress = repo.progress(session, Kind.RECONCILE)
    assert progress is not None
    return pass_id, progress.released_chunks, progress.total_chunks


# --- running a chunk ---------------------------------------------------------------------------


@dataclass(slots=True)
class ChunkOutcome:
    state: str  # done, yielded, paused, busy (a live worker holds it), gone (nothing to do)
    chats: int = 0
    rows: int = 0
    seconds: float = 0.0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_chunk(
    factory: sessionmaker[Session], settings: Settings, pass_id: int, ordinal: int
) -> ChunkOutcome:
    """Run one chunk to its end, or until its time is up or its pass is paused. A chunk that a
    live worker holds already (a duplicate delivery) is left to it."""
    with transaction(factory) as session:
        found = repo.find(session, pass_id, ordinal)
    if found is None:
        return ChunkOutcome("gone")
    engine = factory.kw["bind"]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as hold:
        if not repo.try_hold(hold, found.id):
            return ChunkOutcome("busy")
        try:
            with transaction(factory) as session:
                chunk = repo.claim(session, found.id, worker_name())
            if chunk is None:
                return ChunkOutcome("gone")
            try:
                return _run(factory, settings, chunk)
            except Exception as exc:  # recorded on the chunk, then raised for the task's log
                _record_error(factory, settings, chunk, exc)
                raise
        finally:
            repo.release_hold(hold, found.id)


def _record_error(
    factory: sessionmaker[Session], settings: Settings, chunk: Chunk, exc: Exception
) -> None:
    try:
        with transaction(factory) as session:
            repo.give_up_claim(
                session,
                chunk.id,
                error=f"{type(exc).__name__}: {exc}",
                max_attempts=settings.bulk_chunk_max_attempts,
            )
    except Exception as lost:  # the database is gone too: the next dispatch takes it back
        log.warning(
            "chunk %d of pass #%d: could not record its error: %s",
            chunk.ordinal,
            chunk.pass_id,
            lost,
        )


def _run(factory: sessionmaker[Session], settings: Settings, chunk: Chunk) -> ChunkOutcome:
    outcome = ChunkOutcome("done")
    started = time.monotonic()
    size = settings.backfill_batch_size
    cursor = chunk.cursor or chunk.lo
    pause_name = next(name for name, kind in PAUSES.items() if kind is chunk.kind)
    if chunk.kind is Kind.RECONCILE:
        with transaction(factory) as session:
            phase = phase_repo.current(session)
        if phase.phase is Phase.TABLE_ONLY or phase.contracted:
            with transaction(factory) as session:
                repo.end(session, chunk.id, state="done", error="skipped: the rows are canonical")
            return ChunkOutcome("done")
    failures = 0
    while True:
        if time.monotonic() - started >= settings.bulk_chunk_seconds:
            outcome.state = "yielded"
            break
        batch_started = time.monotonic()
        try:
            with transaction(factory) as session:
                if bulk_paused.is_paused(session, pause_name) is not None:
                    outcome.state = "paused"
                    break
                reconcile_runs.limit_transaction(
                    session,
                    statement_timeout_ms=settings.bulk_statement_timeout_ms,
                    lock_timeout_ms=settings.migration_lock_timeout_ms,
                )
                ids = repo.chat_ids(
                    session,
                    after=cursor,
                    hi=chunk.hi,
                    limit=size,
                    existed_at=chunk.pass_started_at if chunk.kind is Kind.BACKFILL else None,
                )
                if not ids:
                    break
                if chunk.kind is Kind.BACKFILL:
                    rows, bad_elements, bad_chats = backfill_repo.copy_batch(session, ids)
                    repo.advance(
                        session,
                        chunk.id,
                        ids[-1],
                        time.monotonic() - batch_started,
                        chats=len(ids),
                        rows=rows,
                        bad_elements=bad_elements,
                        bad_chats=bad_chats,
                    )
                else:
                    lost = dead_letters.chats_with_open(
                        session, ids, dead_letters.Reason.WORKER_LOST
                    )
                    rows = 0
            if chunk.kind is Kind.RECONCILE:
                rows = _reconcile_batch(factory, settings, chunk, ids, lost, batch_started)
        except DBAPIError as error:
            # A lock or statement timeout (the database is busy, or the batch too big): halve
            # and try again; anything else, or too many in a row, ends the claim (taken again).
            failures += 1
            if getattr(error.orig, "sqlstate", None) not in ("55P03", "57014", "40P01", "40001"):
                raise
            if failures > 20:
                raise
            size = max(1, size // 2)
            time.sleep(min(5.0, 0.1 * 2**failures))
            continue
        failures = 0
        cursor = ids[-1]
        outcome.chats += len(ids)
        outcome.rows += rows
        elapsed = time.monotonic() - batch_started
        # The migration's pace: grow while batches finish well inside the budget, halve and
        # pause longer when one overruns it.
        if elapsed > settings.backfill_batch_seconds:
            size = max(1, size // 2)
            time.sleep(min(elapsed, 10 * settings.backfill_batch_seconds) / 10)
        elif elapsed < settings.backfill_batch_seconds / 2:
            size = min(settings.backfill_max_batch_size, size * 2)
        if settings.backfill_pause_seconds:
            time.sleep(settings.backfill_pause_seconds)
    with transaction(factory) as session:
        repo.end(session, chunk.id, state="done" if outcome.state == "done" else "pending")
    outcome.seconds = time.monotonic() - started
    return outcome


def _reconcile_batch(
    factory: sessionmaker[Session],
    settings: Settings,
    chunk: Chunk,
    ids: list[uuid.UUID],
    lost: set[uuid.UUID] | Sequence[uuid.UUID],
    batch_started: float,
) -> int:
    """Converge these chats as the full reconcile does (`reconcile.check_chats`), then move the
    cursor. A chunk killed between the two checks the batch again: a repair is idempotent."""
    report = reconcile_service.check_chats(
        factory,
        [i for i in ids if i not in lost],
        limits=reconcile_service.Limits(
            statement_timeout_ms=settings.reconcile_statement_timeout_ms,
            lock_timeout_ms=settings.reconcile_lock_timeout_ms,
        ),
        label=f"pass #{chunk.pass_id} chunk {chunk.ordinal}",
    )
    with transaction(factory) as session:
        repo.advance(
            session,
            chunk.id,
            ids[-1],
            time.monotonic() - batch_started,
            chats=len(ids),
            rows=report.messages,
            bad_elements=report.bad_elements,
            inserted=report.inserted,
            updated=report.updated,
            soft_deleted=report.soft_deleted,
            behind=report.behind,
            timed_out=report.timed_out,
            skipped=len(lost),
        )
    return report.messages


def eta_seconds(progress: repo.PassProgress) -> float | None:
    """Time left at the pass's rate so far (chats per second since its first chunk started)."""
    if progress.state == "finished" or progress.chats <= 0 or progress.elapsed_seconds <= 0:
        return None
    rate = progress.chats / progress.elapsed_seconds
    left = max(0, progress.total_chats - progress.chats)
    return left / rate if rate > 0 else math.inf
