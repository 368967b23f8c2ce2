"""Moving the rollout from one phase to the next, behind gates, and the final contract.

A step runs in one transaction that locks the phase row `FOR UPDATE`: it waits for the
mutations and syncs in flight (each holds the row `FOR SHARE`) and holds the next ones until it
commits. A step that changes which store is the source of truth (into or out of `table_only`)
first catches the follower up, in batches, outside that lock, recorded as `pending` (an
interrupted step is finished or undone by the next `phase set`), then converges what is still
behind under the lock, so that the new source of truth starts complete: no acknowledged write is
left behind in the store that stops being read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.repositories import phase as phase_repo
from app.repositories import reconcile_runs, sync_state
from app.services import sync
from app.settings import Phase, Settings

CATCH_UP_BATCH = 200
# What may still be behind when the step takes its lock and converges the rest: small enough
# that the mutations it holds up wait a moment, not a backlog.
CATCH_UP_LEFT = 5


class Refused(Exception):
    """A step or contract that a gate (or the state of the database) does not allow."""


@dataclass(frozen=True, slots=True)
class Gate:
    name: str
    ok: bool
    detail: str


def gates(session: Session, settings: Settings, state: phase_repo.State, to: Phase) -> list[Gate]:
    """The gates of the step from the current phase to `to`, each with what it found."""
    if state.contracted:
        return [Gate("not contracted", False, "the JSONB column is gone: there is no way back")]
    current = state.phase
    result = []
    forward = to.position > current.position
    step = to.position - current.position
    result.append(
        Gate(
            "one step",
            abs(step) <= 1,
            f"{current.value} -> {to.value}"
            + ("" if abs(step) <= 1 else f" skips {abs(step) - 1} phase(s)"),
        )
    )
    if not forward:
        return result
    result.append(
        Gate(
            "phase held",
            state.held_seconds >= settings.phase_gate_min_seconds,
            f"{current.value} held {state.held_seconds:.0f}s of the "
            f"{settings.phase_gate_min_seconds:.0f}s required (PHASE_GATE_MIN_SECONDS)",
        )
    )
    if to is Phase.READ_TABLE:
        # Over every chat (a `--since` window proves nothing about the rest). "ok": a dry run
        # found no drift, or a repair left none (lag is not drift).
        last = reconcile_runs.last_finished(session, whole=True)
        clean = last is not None and last.outcome == "ok"
        result.append(
            Gate(
                "clean reconcile",
                clean,
                "no finished reconcile of every chat"
                if last is None
                else f"last reconcile #{last.id}: {last.outcome}, drift {last.drift}"
                + ("" if last.dry_run else " (repaired)"),
            )
        )
        since = last.finished_at if last is not None else None
        mismatches = phase_repo.mismatches_since(session, since)
        result.append(
            Gate(
                "no shadow mismatch",
                mismatches == 0,
                f"{mismatches} shadow-read mismatches since the last reconcile",
            )
        )
    return result


def next_forward(phase: Phase) -> Phase | None:
    order = list(Phase)
    return order[phase.position + 1] if phase.position + 1 < len(order) else None


@dataclass(frozen=True, slots=True)
class Moved:
    from_phase: Phase
    to: Phase
    forced: bool
    caught_up: int  # chats converged so that the new source of truth starts complete
    failed_gates: list[Gate]


def _changes_source(a: Phase, b: Phase) -> bool:
    return (a is Phase.TABLE_ONLY) != (b is Phase.TABLE_ONLY)


def set_phase(
    factory: sessionmaker[Session],
    settings: Settings,
    to: Phase,
    *,
    who: str,
    force: bool = False,
    lock_timeout_ms: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> Moved:
    """Move to `to` (one step), or raise `Refused` naming the failed gate, changing nothing."""
    with transaction(factory) as session:
        state = phase_repo.current(session)
        checked = gates(session, settings, state, to)
        failed = [g for g in checked if not g.ok]
        if state.contracted:
            raise Refused(failed[0].detail)
        if to is state.phase:
            # Nothing to move; an interrupted step towards another phase is undone.
            phase_repo.set_pending(session, None)
            return Moved(state.phase, to, force, 0, [])
        # `--force` steps past the evidence, never past a phase: each step's catch-up and
        # checks assume the phase next to it.
        binding = failed if not force else [g for g in failed if g.name == "one step"]
        if binding:
            raise Refused("; ".join(f"gate '{g.name}' failed: {g.detail}" for g in binding))
        catch_up = _changes_source(state.phase, to)
        if catch_up:
            phase_repo.set_pending(session, to)
    caught_up = 0
    if catch_up:
        caught_up += _catch_up(factory, progress)
    with transaction(factory) as session:
        locked = _lock_for_change(session, lock_timeout_ms)
        if locked.phase is not state.phase or locked.contracted:
            raise Refused(f"the phase changed meanwhile (now {locked.phase.value}); run it again")
        if catch_up:
            # Mutations wait now: converge what is still behind in the direction still in force.
            session.execute(text("SET LOCAL lock_timeout = 0"))
            caught_up += _converge_behind(session, limit=None)
            if to is Phase.TABLE_ONLY:
                sync_state.start_table_heads(session)
        phase_repo.change(
            session,
            to=to,
            who=who,
            forced=bool(failed),
            note="; ".join(f"{g.name}: {g.detail}" for g in failed) if failed else None,
        )
    return Moved(state.phase, to, bool(failed), caught_up, failed)


def _lock_for_change(session: Session, lock_timeout_ms: int, attempts: int = 5) -> phase_repo.State:
    """The phase row `FOR UPDATE`. Mutations and syncs hold it `FOR SHARE` while they run, and a
    share lock is granted even while an update waits, so a busy system may leave no moment
    free: each try waits at most `lock_timeout_ms`, in a savepoint, and a few are made."""
    for attempt in range(attempts):
        try:
            with session.begin_nested():
                session.execute(text(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}"))
                return phase_repo.for_change(session)
        except DBAPIError as exc:
            if attempt + 1 == attempts:
                raise Refused(
                    f"could not lock the phase within {attempts} tries of {lock_timeout_ms} ms "
                    f"(long transactions hold it); nothing changed, try again: {exc.orig}"
                ) from None
    raise AssertionError("unreachable")


def _converge_behind(session: Session, *, limit: int | None) -> int:
    """Sync the chats that are behind, in the direction of the phase in force; how many."""
    done = 0
    previous: set[object] = set()
    while True:
        behind = sync_state.behind_ids(session, limit=CATCH_UP_BATCH)
        if not behind:
            return done
        if set(behind) == previous:
            raise Refused(
                f"{len(behind)} chats stay behind after a sync (first: {min(behind)}); see "
                "`python -m app dead-letters list`; nothing changed"
            )
        previous = set(behind)
        sync.sync_chats(session, behind)
        done += len(behind)
        if limit is not None and done >= limit:
            return done


def _catch_up(factory: sessionmaker[Session], progress: Callable[[str], None] | None) -> int:
    """Outside the lock, in batches: bring the follower up until little is left."""
    done = 0
    started = time.monotonic()
    while True:
        with transaction(factory) as session:
            left = sync_state.count_behind(session)
            if left <= CATCH_UP_LEFT:
                return done
            done += _converge_behind(session, limit=CATCH_UP_BATCH)
        if progress is not None:
            progress(
                f"catching up: {done} chats converged, {left} were behind "
                f"({time.monotonic() - started:.0f}s)"
            )


def contract(factory: sessionmaker[Session], settings: Settings, *, who: str) -> None:
    """Drop the JSONB column and what only served it. Refused unless the phase is `table_only`
    and has held for `CONTRACT_MIN_TABLE_ONLY_SECONDS`, or while a reconcile runs."""
    engine = factory.kw["bind"]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock:
        # Held for the whole contract: no reconcile starts while the column goes.
        if not reconcile_runs.try_lock(lock):
            raise Refused("a reconcile holds its lock; wait for it to finish, then contract")
        try:
            with transaction(factory) as session:
                state = _lock_for_change(session, 5000)
                # The column goes under ACCESS EXCLUSIVE: every chat read queues behind it.
                session.execute(text("SET LOCAL lock_timeout = 5000"))
                if state.contracted:
                    raise Refused(f"already contracted at {state.contracted_at:%Y-%m-%d %H:%M}")
                if state.phase is not Phase.TABLE_ONLY:
                    raise Refused(
                        f"the phase is {state.phase.value}; the contract needs table_only"
                    )
                if state.held_seconds < settings.contract_min_table_only_seconds:
                    raise Refused(
                        f"table_only has held {state.held_seconds:.0f}s of the "
                        f"{settings.contract_min_table_only_seconds:.0f}s required "
                        "(CONTRACT_MIN_TABLE_ONLY_SECONDS)"
                    )
                try:
                    for statement in CONTRACT:
                        session.execute(text(statement))
                except DBAPIError as exc:
                    if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                        raise
                    raise Refused(
                        "could not lock copilot_chats within 5 s (long transactions hold it); "
                        "reads and writes of chats waited meanwhile; try again"
                    ) from None
                phase_repo.mark_contracted(session, who=who)
        finally:
            reconcile_runs.unlock(lock)


# Everything that only served the JSONB: the column, its version and triggers, the backfill's
# state. Catalog changes only (a dropped column is not rewritten), under one short lock.
CONTRACT = [
    "DROP TRIGGER IF EXISTS copilot_chats_mark_wanted ON copilot_chats",
    "DROP TRIGGER IF EXISTS copilot_chats_bump_version ON copilot_chats",
    "DROP FUNCTION IF EXISTS copilot_chats_mark_wanted()",
    "DROP FUNCTION IF EXISTS copilot_chats_bump_version()",
    "ALTER TABLE copilot_chats DROP COLUMN messages, DROP COLUMN messages_version",
    "DROP TABLE IF EXISTS dualwrite_backfill",
]
