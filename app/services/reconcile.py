"""Reconcile: compare every chat's JSONB with its rows, in keyset batches, and repair drift.

Repairs go through the same guarded convergence as the live sync (and take the same per-chat
locks), so a reconcile racing live writes can never overwrite newer rows. Each batch is its own
transaction: no lock is held longer than one batch. A session-level advisory lock lets only one
reconcile run at a time; another one returns at once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.repositories import chats as chats_repo
from app.repositories import messages as messages_repo
from app.repositories import reconcile_runs
from app.services import sync

LOCK_KEY = (7302, 1)
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


@dataclass(slots=True)
class ReconcileReport:
    run_id: int
    dry_run: bool
    total_chats: int | None = None
    chats: int = 0
    messages: int = 0
    bad_elements: int = 0
    inserted: int = 0
    updated: int = 0
    soft_deleted: int = 0
    seconds: float = 0.0
    outcome: str = "running"

    @property
    def drift(self) -> int:
        return self.inserted + self.updated + self.soft_deleted


def reconcile(
    factory: sessionmaker[Session],
    *,
    since: timedelta | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
    trigger: str = "cli",
    count_first: bool = False,
    progress: Callable[[ReconcileReport], None] | None = None,
) -> ReconcileReport | None:
    """Run one reconcile; None when another one holds the lock."""
    engine = factory.kw["bind"]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock:
        got = lock.execute(
            text("SELECT pg_try_advisory_lock(:a, :b)"), {"a": LOCK_KEY[0], "b": LOCK_KEY[1]}
        ).scalar_one()
        if not got:
            return None
        try:
            return _run(factory, since, dry_run, batch_size, trigger, count_first, progress)
        finally:
            lock.execute(
                text("SELECT pg_advisory_unlock(:a, :b)"), {"a": LOCK_KEY[0], "b": LOCK_KEY[1]}
            )


def _run(
    factory: sessionmaker[Session],
    since: timedelta | None,
    dry_run: bool,
    batch_size: int,
    trigger: str,
    count_first: bool,
    progress: Callable[[ReconcileReport], None] | None,
) -> ReconcileReport:
    with transaction(factory) as session:
        run_id = reconcile_runs.start(session, since=since, dry_run=dry_run, trigger=trigger)
        total = chats_repo.count(session, since=since) if count_first else None
    report = ReconcileReport(run_id=run_id, dry_run=dry_run, total_chats=total)
    started = time.perf_counter()
    error: str | None = None
    try:
        after = None
        while True:
            with transaction(factory) as session:
                ids = chats_repo.ids_after(session, after, batch_size, since=since)
                if not ids:
                    break
                if dry_run:
                    done = sync.SyncReport()
                    for counts in messages_repo.diff(session, ids):
                        done.add(counts)
                else:
                    done = sync.resync(session, ids)
                _add(report, done)
                report.chats += len(ids)
            after = ids[-1]
            report.seconds = time.perf_counter() - started
            if progress is not None:
                progress(report)
        report.outcome = "drift" if dry_run and report.drift else "ok"
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
                duration_seconds=report.seconds,
            )
    return report


def _add(report: ReconcileReport, batch: sync.SyncReport) -> None:
    report.messages += batch.elements
    report.bad_elements += batch.bad_elements
    report.inserted += batch.inserted
    report.updated += batch.updated
    report.soft_deleted += batch.removed
