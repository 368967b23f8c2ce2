"""Reconcile: compare every chat's JSONB with its rows, in keyset batches, and repair drift.

Repairs go through the same guarded convergence as the live sync (and take the same per-chat
locks), so a reconcile racing live writes can never overwrite newer rows. Each batch is its own
transaction under the reconcile's own lock and statement timeouts: no lock is held longer than one
batch, and a batch that hits a timeout is retried in halves, down to single chats; a chat that
still hits one alone is dead-lettered (`reconcile_timeout`) and the run goes on. Chats whose sync
keeps killing workers (an open `worker_lost` dead letter) are skipped. A session-level advisory
lock lets only one reconcile run at a time; another one returns at once, and a run that takes it
marks any run still `running` as killed.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.repositories import chats as chats_repo
from app.repositories import dead_letters, reconcile_runs, sync_state
from app.repositories import phase as phase_repo
from app.services import drift, sync
from app.settings import Phase, get_settings

log = logging.getLogger(__name__)

LOCK_KEY = reconcile_runs.LOCK_KEY
RECONCILE_TASK = "chats.reconcile"  # the name its dead letters carry
MAX_INTERVAL = timedelta(days=36500)  # `now() - interval` must stay a valid timestamp

_UNITS = {
    "s": "seconds", "sec": "seconds", "second": "seconds", "seconds": "seconds",
    "m": "minutes", "min": "minutes", "minute": "minutes", "minutes": "minutes",
    "h": "hours", "hour": "hours", "hours": "hours",
    "d": "days", "day": "days", "days": "days",
    "w": "weeks", "week": "weeks", "weeks": "weeks",
}  # fmt: skip
_PART = re.compile(r"\s*(\d{1,6})\s*([a-z]+)\s*,?", re.IGNORECASE)


def parse_interval(value: str) -> timedelta:
    """'7 days', '12 hours', '1 day 6 hours', '30m' -> timedelta. Anything else is refused."""
    parts: dict[str, int] = {}
    position = 0
    stripped = value.strip()
    while position < len(stripped):
        match = _PART.match(stripped, position)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None or unit in parts:
            raise ValueError(
                f"invalid interval {value!r}: expected a number and a unit, "
                "such as '7 days', '12 hours', '1 day 6 hours' or '30m'"
            )
        parts[unit] = int(match.group(1))
        position = match.end()
    if not parts:
        raise ValueError(f"invalid interval {value!r}: it is empty")
    try:
        interval = timedelta(**parts)
    except OverflowError:
        interval = MAX_INTERVAL + MAX_INTERVAL
    if interval <= timedelta(0):
        raise ValueError(f"invalid interval {value!r}: it must be positive")
    if interval > MAX_INTERVAL:
        raise ValueError(f"invalid interval {value!r}: at most {MAX_INTERVAL.days} days")
    return interval


@dataclass(frozen=True, slots=True)
class Limits:
    """The reconcile's database timeouts, set on each of its batch transactions."""

    statement_timeout_ms: int
    lock_timeout_ms: int


@dataclass(slots=True)
class ReconcileReport:
    run_id: int
    dry_run: bool
    total_chats: int | None = None
    chats: int = 0  # every chat the run reached, the timed-out and skipped ones included
    messages: int = 0
    bad_elements: int = 0
    inserted: int = 0
    updated: int = 0
    soft_deleted: int = 0
    timed_out: int = 0  # chats given up on alone after a lock or statement timeout
    skipped: int = 0  # chats left alone for an open `worker_lost` dead letter
    # Chats whose JSONB moved on after their copy (live traffic) while a sync is on its way:
    # converged by a repair, left to their sync by a dry run, and not drift (`drift.state`).
    behind: int = 0
    # Chats behind with no sync on its way (`jsonb_only`, or an open blocking dead letter):
    # drift, their rows counted in `inserted`, `updated`, `soft_deleted` like any other.
    stalled: int = 0
    phase: Phase = Phase.DUAL_WRITE  # as the run started: says why no sync is on its way
    killed_runs: list[int] = field(default_factory=list)  # earlier runs found unfinished
    seconds: float = 0.0
    outcome: str = "running"
    label: str = ""  # how logs and dead letters name the run (a chunk has no run id)

    @property
    def drift(self) -> int:
        return self.inserted + self.updated + self.soft_deleted

    @property
    def unchecked(self) -> int:
        return self.timed_out + self.skipped


def reconcile(
    factory: sessionmaker[Session],
    *,
    since: timedelta | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
    trigger: str = "cli",
    count_first: bool = False,
    progress: Callable[[ReconcileReport], None] | None = None,
    limits: Limits | None = None,
) -> ReconcileReport | None:
    """Run one reconcile; None when another one holds the lock. `limits` default to the
    `RECONCILE_*_TIMEOUT_MS` settings."""
    if limits is None:
        settings = get_settings()
        limits = Limits(
            statement_timeout_ms=settings.reconcile_statement_timeout_ms,
            lock_timeout_ms=settings.reconcile_lock_timeout_ms,
        )
    with transaction(factory) as session:
        phase = phase_repo.current(session)
    if phase.phase is Phase.TABLE_ONLY or phase.contracted:
        raise sync.WrongPhase(
            "the rows are the source of truth (table_only); the reverse sync and its sweep keep "
            "the JSONB up to them"
        )
    engine = factory.kw["bind"]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock:
        if not reconcile_runs.try_lock(lock):
            return None
        try:
            return _run(
                factory,
                since,
                dry_run,
                batch_size,
                trigger,
                count_first,
                progress,
                limits,
                phase.phase,
            )
        finally:
            reconcile_runs.unlock(lock)


def _run(
    factory: sessionmaker[Session],
    since: timedelta | None,
    dry_run: bool,
    batch_size: int,
    trigger: str,
    count_first: bool,
    progress: Callable[[ReconcileReport], None] | None,
    limits: Limits,
    phase: Phase,
) -> ReconcileReport:
    with transaction(factory) as session:
        # The lock is held by this process alone, and a run holds it from start to finish: a
        # run still `running` has lost its process or connection (SIGKILL, OOM, a lost host).
        killed = reconcile_runs.mark_killed(session)
        run_id = reconcile_runs.start(session, since=since, dry_run=dry_run, trigger=trigger)
        total = chats_repo.count(session, since=since) if count_first else None
    report = ReconcileReport(
        run_id=run_id, dry_run=dry_run, total_chats=total, killed_runs=killed, phase=phase
    )
    if killed:
        log.warning("reconcile #%d: marked unfinished runs %s as killed", run_id, killed)
    started = time.perf_counter()
    error: str | None = None
    try:
        after = None
        while True:
            with _limited(factory, limits) as session:
                ids = chats_repo.ids_after(session, after, batch_size, since=since)
                if not ids:
                    break
                # Their sync keeps killing workers (an enormous chat, say): converging them here
                # would only move that to the reconcile. They wait for an operator's replay.
                lost = dead_letters.chats_with_open(session, ids, dead_letters.Reason.WORKER_LOST)
            report.chats += len(ids)
            report.skipped += len(lost)
            _check(factory, [i for i in ids if i not in lost], report, dry_run, limits)
            after = ids[-1]
            report.seconds = time.perf_counter() - started
            if progress is not None:
                progress(report)
        if dry_run and report.drift:
            report.outcome = "drift"
        else:
            # Not "ok": some chats were not compared, so this run does not prove them clean.
            report.outcome = "incomplete" if report.unchecked else "ok"
    except BaseException as exc:
        report.outcome, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report.seconds = time.perf_counter() - started
        with transaction(factory) as session:
            reconcile_runs.finish(
                session,
                run_id,
                outcome=report.outcome,
                error=error,
                chats_scanned=report.chats,
                messages_scanned=report.messages,
                bad_elements=report.bad_elements,
                inserted=report.inserted,
                updated=report.updated,
                soft_deleted=report.soft_deleted,
                drift=report.drift,
                chats_timed_out=report.timed_out,
                chats_behind=report.behind,
                chats_skipped=report.skipped,
                duration_seconds=report.seconds,
            )
    return report


def check_chats(
    factory: sessionmaker[Session],
    ids: Sequence[uuid.UUID],
    *,
    limits: Limits,
    label: str,
) -> ReconcileReport:
    """Converge these chats as a full reconcile's batch does (timeouts retried in halves, a
    chat that still times out alone dead-lettered), without a run of its own: a chunk of a
    rolling pass (`app.services.bulk_passes`) records its counts on its chunk instead."""
    report = ReconcileReport(run_id=0, dry_run=False, label=label)
    _check(factory, ids, report, False, limits)
    return report


def _check(
    factory: sessionmaker[Session],
    ids: Sequence[uuid.UUID],
    report: ReconcileReport,
    dry_run: bool,
    limits: Limits,
) -> None:
    """Compare (or converge) these chats, one transaction per piece. A piece that hits a lock or
    statement timeout is rolled back and retried in halves, so one chat held by a long sync, or
    too big for the statement timeout, costs its batch a few retries rather than the run."""
    pieces = [list(ids)] if ids else []
    while pieces:
        piece = pieces.pop()
        try:
            with _limited(factory, limits) as session:
                if dry_run:
                    # Versions first: a copy that claimed to be current before the diff's
                    # snapshot and still differs in it is drift; a newer JSONB is lag, if a
                    # sync is on its way to copy it (as `resync` judges a repair).
                    recorded = sync_state.versions(session, piece)
                    phase = phase_repo.current(session).phase
                    unfollowed = drift.unfollowed(session, piece, phase)
                    diff = drift.compare(session, piece)
                    done = sync.SyncReport.checked(diff, recorded, unfollowed)
                else:
                    done = sync.resync(session, piece)
        except DBAPIError as exc:
            reason = _timeout(exc, limits)
            if reason is None:
                raise
            if len(piece) > 1:
                half = len(piece) // 2
                pieces += [piece[half:], piece[:half]]  # the first half is popped first
                continue
            _give_up(factory, piece[0], reason, report)
            continue
        _add(report, done)


def _give_up(
    factory: sessionmaker[Session], chat_id: uuid.UUID, reason: str, report: ReconcileReport
) -> None:
    report.timed_out += 1
    run = report.label or f"reconcile #{report.run_id}"
    log.warning("%s: chat %s left unchecked: %s", run, chat_id, reason)
    if report.dry_run:
        return  # a dry run records its run, nothing else; the log names the chat
    with transaction(factory) as session:
        dead_letters.record(
            session,
            task=RECONCILE_TASK,
            chat_id=chat_id,
            args=[str(chat_id)],
            reason=dead_letters.Reason.RECONCILE_TIMEOUT,
            error=f"{run} gave up on this chat alone: {reason}",
            attempts=1,
        )


def _timeout(exc: DBAPIError, limits: Limits) -> str | None:
    """The limit this error is, in words; None when it is no lock or statement timeout (an
    operator's `pg_cancel_backend` is also 57014, and stops the run as any other error)."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate == "55P03":  # lock_not_available
        return (
            f"lock timeout: waited more than {limits.lock_timeout_ms} ms for a lock on the "
            f"chat (a sync or a handler holds it) ({exc.orig})"
        )
    if sqlstate == "57014" and "statement timeout" in str(exc.orig):  # query_canceled
        return f"statement timeout: ran longer than {limits.statement_timeout_ms} ms ({exc.orig})"
    return None


@contextmanager
def _limited(factory: sessionmaker[Session], limits: Limits) -> Iterator[Session]:
    with transaction(factory) as session:
        reconcile_runs.limit_transaction(
            session,
            statement_timeout_ms=limits.statement_timeout_ms,
            lock_timeout_ms=limits.lock_timeout_ms,
        )
        yield session


def _add(report: ReconcileReport, batch: sync.SyncReport) -> None:
    report.messages += batch.elements
    report.bad_elements += batch.bad_elements
    report.inserted += batch.inserted
    report.updated += batch.updated
    report.soft_deleted += batch.removed
    report.behind += batch.behind
    report.stalled += batch.stalled
