"""Moving the rollout from one phase to the next, behind gates, and the final contract.

A step runs in one transaction that locks the phase for a change (`phase_repo.for_change`): it
waits for the writes and syncs in flight (each holds the phase row `FOR SHARE`: this service's
mutations and syncs, and through the version triggers any other writer of the JSONB) and holds
the next ones until it commits. A step that changes which store is the source of truth (into or
out of `table_only`) first catches the follower up outside that lock, in passes over finite sets
of chats, recorded as `pending` (an interrupted step is finished or undone by the next `phase
set`), then converges the few still behind under the lock, so that the new source of truth
starts complete: no acknowledged write is left behind in the store that stops being read.

Every step and the contract finish or refuse within `PHASE_STEP_TIMEOUT_SECONDS`; a refusal is
one line naming why, and changes nothing.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.repositories import backfill, bulk_passes, dead_letters, reconcile_runs, sync_state
from app.repositories import phase as phase_repo
from app.services import sync
from app.settings import Phase, Settings


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
    if to is Phase.VERIFY_READS:
        result.append(_backfill_gate(session))
    if to is Phase.READ_TABLE:
        # Over every chat (a `--since` window proves nothing about the rest), started after
        # the dual-write began (before it, the table was not kept up): an in-process reconcile
        # of every chat, or every chunk of one rolling pass, however many nights it took.
        # "ok": a dry run found no drift, or a repair left none (lag is not drift).
        gate, since = _reconcile_gate(session, state)
        result.append(gate)
        mismatches = phase_repo.mismatches_since(session, since)
        result.append(
            Gate(
                "no shadow mismatch",
                mismatches == 0,
                f"{mismatches} shadow-read mismatches since the last reconcile",
            )
        )
    return result


def _backfill_gate(session: Session) -> Gate:
    """The copy must be complete before reads are compared with it."""
    fleet = bulk_passes.progress(session, bulk_passes.Kind.BACKFILL)
    if fleet is not None and fleet.state != "finished":
        return Gate(
            "backfill finished",
            False,
            f"the fleet backfill (pass #{fleet.id}) is {fleet.state}: {fleet.chunks_done}/"
            f"{fleet.total_chunks} chunks done",
        )
    copied = backfill.progress(session)
    if copied is not None and copied.finished_at is None and fleet is None:
        return Gate(
            "backfill finished",
            False,
            f"the backfill stopped at {copied.chats_done}/{copied.total_chats} chats; "
            "`alembic upgrade head` resumes it (with BACKFILL_ON_WORKERS, "
            "`python -m app backfill resume`)",
        )
    return Gate("backfill finished", True, "the copy of every chat that existed is done")


def _dual_write_began(session: Session, state: phase_repo.State) -> datetime | None:
    """Since when the table has been written: what a reconcile must postdate to prove it."""
    if state.phase is Phase.DUAL_WRITE:
        return state.since
    return phase_repo.entered(session, Phase.DUAL_WRITE)


def _reconcile_gate(session: Session, state: phase_repo.State) -> tuple[Gate, datetime | None]:
    last = reconcile_runs.last_finished(session, whole=True)
    began = _dual_write_began(session, state)
    passes = bulk_passes.complete_reconciles(session, started_after=began)
    rolling = passes[0] if passes else None
    if rolling is not None and (
        last is None
        or last.finished_at is None
        or (rolling.finished_at is not None and rolling.finished_at >= last.finished_at)
    ):
        ok = rolling.complete
        return (
            Gate(
                "clean reconcile",
                ok,
                f"rolling pass #{rolling.id}: {rolling.chunks_done}/{rolling.total_chunks} chunks "
                f"over {rolling.chats} chats, drift {rolling.drift} (repaired)"
                + (
                    ""
                    if rolling.complete
                    else f"; not complete ({rolling.timed_out} timed out, {rolling.skipped} "
                    "skipped)"
                ),
            ),
            rolling.finished_at,
        )
    if last is None:
        open_pass = bulk_passes.progress(session, bulk_passes.Kind.RECONCILE)
        detail = "no finished reconcile of every chat"
        if open_pass is not None and open_pass.state != "finished":
            detail += (
                f" (rolling pass #{open_pass.id}: {open_pass.chunks_done}/"
                f"{open_pass.total_chunks} chunks done)"
            )
        return Gate("clean reconcile", False, detail), None
    recent = began is None or last.started_at >= began
    return (
        Gate(
            "clean reconcile",
            last.outcome == "ok" and recent,
            f"last reconcile #{last.id}: {last.outcome}, drift {last.drift}"
            + ("" if last.dry_run else " (repaired)")
            + ("" if recent else "; it started before dual_write began"),
        ),
        last.finished_at,
    )


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


Progress = Callable[[str], None]


class _Deadline:
    """The step's time budget (`PHASE_STEP_TIMEOUT_SECONDS`), from its start."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.pending_set = False  # the step marked itself pending: a refusal clears the mark

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def bound(self, session: Session, settings: Settings) -> None:
        """No statement of this transaction outlives the step's time, nor waits for a lock
        longer than `PHASE_LOCK_WAIT_MS` (a sync of the same chats takes far less)."""
        ms = min(settings.worker_statement_timeout_ms, max(1000, int(self.left() * 1000)))
        session.execute(text(f"SET LOCAL statement_timeout = {ms}"))
        session.execute(text(f"SET LOCAL lock_timeout = {settings.phase_lock_wait_ms}"))

    def check(self, doing: str) -> None:
        if self.left() <= 0:
            raise Refused(
                f"{doing} did not finish within PHASE_STEP_TIMEOUT_SECONDS ({self.seconds:.0f}s)"
            )


def set_phase(
    factory: sessionmaker[Session],
    settings: Settings,
    to: Phase,
    *,
    who: str,
    force: bool = False,
    progress: Progress | None = None,
) -> Moved:
    """Move to `to` (one step), or raise `Refused` naming why, changing nothing.

    Finishes or refuses within `PHASE_STEP_TIMEOUT_SECONDS`, whatever the write rate: a step
    that changes the source of truth catches the follower up outside the lock in passes over
    finite sets of chats until few are behind, then holds every writer (this service's, the
    previous release's, a script's: all hold the phase) while it converges those few.
    """
    deadline = _Deadline(settings.phase_step_timeout_seconds)
    say = progress or (lambda line: None)
    try:
        try:
            return _step(factory, settings, to, who=who, force=force, deadline=deadline, say=say)
        except DBAPIError as exc:
            raise Refused(f"a statement of the step failed: {_one_line(exc)}") from None
    except Refused as refused:
        if deadline.pending_set:
            left = _undo_pending(factory, settings)
            if left:
                raise Refused(f"{refused}{left}") from None
        raise


def _step(
    factory: sessionmaker[Session],
    settings: Settings,
    to: Phase,
    *,
    who: str,
    force: bool,
    deadline: _Deadline,
    say: Progress,
) -> Moved:
    with transaction(factory) as session:
        state = phase_repo.current(session)
        checked = gates(session, settings, state, to)
        failed = [g for g in checked if not g.ok]
        if state.contracted:
            raise Refused(failed[0].detail)
        # `--force` steps past the evidence, never past a phase: each step's catch-up and
        # checks assume the phase next to it.
        binding = failed if not force else [g for g in failed if g.name == "one step"]
        if to is not state.phase and binding:
            raise Refused("; ".join(f"gate '{g.name}' failed: {g.detail}" for g in binding))
        catch_up = _changes_source(state.phase, to)
        if to is state.phase:
            # Nothing to move; an interrupted step towards another phase is undone.
            if state.pending is not None:
                _same_phase(_lock_for_change(session, settings, deadline, say), state)
                phase_repo.set_pending(session, None)
            return Moved(state.phase, to, force, 0, [])
        if catch_up:
            _same_phase(_lock_for_change(session, settings, deadline, say), state)
            phase_repo.set_pending(session, to)
    deadline.pending_set = catch_up
    caught_up = _catch_up(factory, settings, deadline, say) if catch_up else 0
    with transaction(factory) as session:
        _same_phase(_lock_for_change(session, settings, deadline, say), state)
        if catch_up:
            # Every writer waits now: converge what is still behind, in the direction still in
            # force. Nothing here may wait long for a lock (a transaction holding a chat would
            # hold every writer with it): refuse instead (see `_Deadline.bound`).
            caught_up += _converge_held(session, settings, deadline, say)
            if to is Phase.TABLE_ONLY:
                sync_state.start_table_heads(session)
        phase_repo.change(
            session,
            to=to,
            who=who,
            forced=bool(failed),
            note="; ".join(f"{g.name}: {g.detail}" for g in failed) if failed else None,
        )
    deadline.pending_set = False
    return Moved(state.phase, to, bool(failed), caught_up, failed)


def _one_line(exc: DBAPIError) -> str:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate == "55P03":  # lock_not_available
        return (
            "a lock was not granted within PHASE_LOCK_WAIT_MS (another transaction holds a "
            "chat or its sync state); try again"
        )
    if sqlstate == "57014":  # query_canceled: statement_timeout
        return "a statement ran past the step's time (PHASE_STEP_TIMEOUT_SECONDS)"
    lines = str(exc.orig).strip().splitlines()
    return f"{type(exc.orig).__name__}: {lines[0] if lines else ''}"


def _same_phase(locked: phase_repo.State, seen: phase_repo.State) -> None:
    if locked.phase is not seen.phase or locked.contracted:
        raise Refused(f"the phase changed meanwhile (now {locked.phase.value}); run it again")


def _undo_pending(factory: sessionmaker[Session], settings: Settings) -> str:
    """A refused step leaves no pending mark. A sync that waits for a chat's lock holds the
    phase meanwhile, for at most `WORKER_LOCK_TIMEOUT_MS`: the mark is cleared within about that
    long, or the refusal says it stays (it only says that a step was tried; the next `phase set`
    finishes or clears it)."""
    budget = _Deadline(settings.worker_lock_timeout_ms / 1000 + 5.0)
    try:
        with transaction(factory) as session:
            _lock_for_change(session, settings, budget, None, max_pause=0.5)
            phase_repo.set_pending(session, None)
        return ""
    except (DBAPIError, Refused):
        return "; the step's pending mark stays (`python -m app phase` shows it)"


def _lock_for_change(
    session: Session,
    settings: Settings,
    deadline: _Deadline,
    say: Progress | None,
    *,
    max_pause: float = 5.0,
) -> phase_repo.State:
    """The phase, locked for a change (`phase_repo.for_change`). Each try queues at most
    `PHASE_LOCK_WAIT_MS` (every writer waits behind it meanwhile), in a savepoint; tries repeat
    with backoff until the step's time is up."""
    attempt = 0
    while True:
        try:
            with session.begin_nested():
                session.execute(text(f"SET LOCAL lock_timeout = {settings.phase_lock_wait_ms}"))
                return phase_repo.for_change(session)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            attempt += 1
            pause = min(max_pause, 0.2 * 2**attempt) * random.uniform(0.5, 1.0)
            if deadline.left() < pause + settings.phase_lock_wait_ms / 1000:
                raise Refused(
                    f"could not lock the phase in {attempt} tries of "
                    f"{settings.phase_lock_wait_ms} ms (PHASE_LOCK_WAIT_MS) within "
                    f"PHASE_STEP_TIMEOUT_SECONDS ({deadline.seconds:.0f}s): long transactions "
                    "that write chats hold it; try again"
                ) from None
            if say is not None:
                say(f"waiting for the phase lock: try {attempt} timed out; writers hold it")
            time.sleep(pause)


# Chats synced per transaction while catching up.
CATCH_UP_BATCH = 200
# What may be left behind for the step to converge with every writer held, when the catch-up
# goes no further (hot chats written again as fast as they are converged): at most this many
# seconds of converging, at the rate the catch-up measured, or `CATCH_UP_LEFT` chats.
CATCH_UP_LEFT = 200
# Passes over the chats behind, outside the lock, before the step judges whether they shrink.
MIN_PASSES = 3


def _catch_up(
    factory: sessionmaker[Session], settings: Settings, deadline: _Deadline, say: Progress
) -> int:
    """Outside the lock: bring the follower up until little is left for the step to converge
    with every writer held.

    Each pass walks the chats that were behind when it began (a finite set, however fast
    writes come) and is judged by versions: a chat is done once its copy holds the version it
    wanted when it was read, whatever was written to it since. A chat that is not is stuck (its
    sync fails) and refuses the step. Passes repeat while they leave more than `CATCH_UP_LEFT`
    chats behind. When the backlog stops shrinking (the same chats written again as fast as
    they are converged), what is left is converged under the lock if that takes at most
    `PHASE_HOLD_MAX_SECONDS` at the rate measured so far; otherwise (or when the step's time
    runs short) the step refuses, saying how many are behind.
    """
    done = 0
    spent = 0.0  # seconds spent converging, for the rate
    passes = 0
    best: int | None = None
    while True:
        with transaction(factory) as session:
            left = sync_state.count_behind(session)
            started = sync_state.now(session)
        if left <= CATCH_UP_LEFT:
            return done
        if passes >= MIN_PASSES and best is not None and left >= best:
            hold = left * spent / done if done else float("inf")
            if hold <= settings.phase_hold_max_seconds:
                say(
                    f"catching up: {left} chats keep falling behind; converging them with "
                    f"writers held (~{hold:.1f}s)"
                )
                return done
            raise Refused(
                f"{left} chats are still behind after {passes} passes of catching up "
                f"({deadline.elapsed():.0f}s), and converging them with writers held would take "
                f"~{hold:.0f}s, above PHASE_HOLD_MAX_SECONDS "
                f"({settings.phase_hold_max_seconds:.0f}s): writes outpace the catch-up; try "
                "again when traffic is lower"
            )
        best = left if best is None else min(best, left)
        passes += 1
        say(f"catching up, pass {passes}: {left} chats behind")
        after: sync_state.Behind | None = None
        while True:
            deadline.check(f"catching up ({left} chats behind at pass {passes})")
            with transaction(factory) as session:
                batch = sync_state.behind_before(session, started, after, limit=CATCH_UP_BATCH)
            if not batch:
                break
            began = time.monotonic()
            _sync_batch(factory, settings, deadline, batch)
            spent += time.monotonic() - began
            done += len(batch)
            after = batch[-1]
            say(f"catching up, pass {passes}: {done} chats converged ({deadline.elapsed():.0f}s)")


def _sync_batch(
    factory: sessionmaker[Session],
    settings: Settings,
    deadline: _Deadline,
    batch: list[sync_state.Behind],
) -> None:
    """Sync a batch in a transaction of its own (tried twice: a worker's sync of the same
    chats may win a race), checking by versions, before it commits, that each chat reached
    what it wanted."""
    wanted = {b.chat_id: b.wanted_version for b in batch}
    for attempt in range(2):
        try:
            with transaction(factory) as session:
                deadline.bound(session, settings)
                sync.sync_chats(session, wanted)
                _check_reached(session, wanted)
            return
        except DBAPIError:
            if attempt == 1 or deadline.left() <= 0:
                raise


def _check_reached(session: Session, wanted: dict[uuid.UUID, int]) -> None:
    """Refuse if a chat's copy is still below the version its sync was asked for."""
    recorded = sync_state.versions(session, list(wanted))
    stuck = sorted(c for c, v in wanted.items() if c in recorded and recorded[c][1] < v)
    if stuck:
        letters = dead_letters.open_reasons(session, stuck)
        why = ", ".join(sorted(set(letters.values()))) or "no dead letter"
        raise Refused(
            f"{len(stuck)} chats stay behind after a sync (first: {stuck[0]}; open dead "
            f"letters: {why}); see `python -m app dead-letters list`"
        )


def _converge_held(session: Session, settings: Settings, deadline: _Deadline, say: Progress) -> int:
    """Under the phase lock, nothing writes: converge every chat still behind, once. A chat
    still behind after its sync is stuck, and refuses the step."""
    deadline.bound(session, settings)
    done = 0
    after: uuid.UUID | None = None
    while True:
        deadline.check(f"converging the last chats behind ({done} done) with writers held")
        batch = sync_state.behind_ids(session, after=after, limit=CATCH_UP_BATCH)
        if not batch:
            return done
        sync.sync_chats(session, batch)
        _check_reached(session, batch)
        done += len(batch)
        after = max(batch)
        say(f"writers held: {done} chats converged")


def contract(factory: sessionmaker[Session], settings: Settings, *, who: str) -> None:
    """Drop the JSONB column and what only served it. Refused unless the phase is `table_only`
    and has held for `CONTRACT_MIN_TABLE_ONLY_SECONDS`, or while a reconcile runs."""
    try:
        _contract(factory, settings, who=who)
    except DBAPIError as exc:
        raise Refused(f"a statement of the contract failed: {_one_line(exc)}") from None


def _contract(factory: sessionmaker[Session], settings: Settings, *, who: str) -> None:
    engine = factory.kw["bind"]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock:
        # Held for the whole contract: no reconcile starts while the column goes.
        if not reconcile_runs.try_lock(lock):
            raise Refused("a reconcile holds its lock; wait for it to finish, then contract")
        try:
            with transaction(factory) as session:
                state = _lock_for_change(
                    session, settings, _Deadline(settings.phase_step_timeout_seconds), None
                )
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
    "DROP TRIGGER IF EXISTS copilot_chats_hold_phase ON copilot_chats",
    "DROP TRIGGER IF EXISTS copilot_chats_mark_wanted ON copilot_chats",
    "DROP TRIGGER IF EXISTS copilot_chats_bump_version ON copilot_chats",
    "DROP FUNCTION IF EXISTS copilot_chats_mark_wanted()",
    "DROP FUNCTION IF EXISTS copilot_chats_bump_version()",
    "DROP FUNCTION IF EXISTS copilot_chats_hold_phase()",
    "DROP FUNCTION IF EXISTS dualwrite_hold_phase()",
    "ALTER TABLE copilot_chats DROP COLUMN messages, DROP COLUMN messages_version",
    "DROP TABLE IF EXISTS dualwrite_backfill",
]
