"""Operator commands: `python -m app <command>` (token, check, reconcile, dead-letters, status,
phase, contract, bulk, backfill)."""

from __future__ import annotations

import argparse
import getpass
import logging
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app import logs
from app.auth import MAX_TTL_SECONDS, issue_token
from app.db import make_engine, make_sessionmaker, transaction
from app.jobs import JobQueue, publish_after_commit
from app.repositories import backfill, bulk_passes, bulk_paused, dead_letters, reconcile_runs
from app.repositories import phase as phase_repo
from app.services import bulk, replay, status
from app.services import bulk_passes as bulk_passes_service
from app.services import phase as phase_service
from app.services.drift import State, find_drift
from app.services.reconcile import ReconcileReport, parse_interval, reconcile
from app.services.sync import WrongPhase
from app.settings import LogFormat, Phase, get_settings

log = logging.getLogger(__name__)


def _json() -> bool:
    return get_settings().log_format is LogFormat.JSON


def _tell(message: str, level: int = logging.INFO) -> None:
    """What the operator is told on stderr (errors, refusals, a step's progress): as written in
    text, a log line in json, so that everything on stderr parses there. Results go to stdout,
    in either format."""
    if _json():
        log.log(level, message)
    else:
        print(message, file=sys.stderr)


@contextmanager
def _sessions() -> Iterator[sessionmaker[Session]]:
    engine = make_engine(get_settings(), worker=True, pool_size=2)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def cmd_token(args: argparse.Namespace) -> int:
    secret = get_settings().signing_secret
    print(issue_token(secret, args.user, admin=args.admin, ttl_seconds=args.ttl))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _sessions() as factory, transaction(factory) as session:
        phase = phase_repo.current(session)
        if phase.contracted:
            print("nothing to check: the JSONB column is gone (contracted)")
            return 0
        found = find_drift(session, batch_size=args.batch_size)
    for chat, kind in found.drifted:
        stalled = " (behind, no sync on its way)" if kind is State.STALLED else ""
        print(
            f"{chat.chat_id}  version {chat.version}{stalled}: {chat.inserted} missing, "
            f"{chat.updated} stale, {chat.removed} extra"
        )
    if found.behind:
        print(_behind_note(found.behind, repaired=False))
    if found.stalled:
        print(_stalled_note(found.stalled, phase.phase, repaired=False))
    print(f"drift: {found.rows} rows in {len(found.drifted)} chats")
    return 1 if found.drifted else 0


# `check` and `reconcile` say the same thing of the same state (see `app.services.drift`).
def _behind_note(chats: int, *, repaired: bool) -> str:
    return (
        f"{chats} chats were merely behind (their JSONB changed after their copy and a sync is "
        "on its way: live traffic, "
        + ("converged here" if repaired else "left to their sync")
        + "); not drift"
    )


def _stalled_note(chats: int, phase: Phase, *, repaired: bool) -> str:
    why = (
        "nothing copies in jsonb_only"
        if phase is Phase.JSONB_ONLY
        else "an open failed or worker_lost dead letter keeps the sweep off them; "
        "see dead-letters list"
    )
    return f"{chats} chats were behind with no sync on its way ({why}): drift" + (
        "; repaired here" if repaired else ""
    )


def _progress(report: ReconcileReport) -> None:
    total = report.total_chats or 0
    done = min(report.chats, total) if total else report.chats
    width = 30
    filled = int(width * done / total) if total else width
    rate = report.chats / report.seconds if report.seconds else 0.0
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} chats, "
        f"{report.messages} messages, {rate:.0f} chats/s"
    )
    sys.stderr.flush()


def cmd_reconcile(args: argparse.Namespace) -> int:
    try:
        since = parse_interval(args.since) if args.since is not None else None
    except ValueError as exc:
        _tell(f"error: --since: {exc}", logging.ERROR)
        return 2
    tty = sys.stderr.isatty() and not _json()
    with _sessions() as factory:
        try:
            report = reconcile(
                factory,
                since=since,
                dry_run=args.dry_run,
                batch_size=args.batch_size or get_settings().reconcile_batch_size,
                trigger="cli",
                count_first=tty,
                progress=_progress if tty else None,
            )
        except WrongPhase as wrong:
            print(f"nothing to reconcile: {wrong}")
            return 0
    if tty:
        sys.stderr.write("\n")
    if report is None:
        print("another reconcile is running: lock is held; nothing done")
        # A repair that finds one running is a no-op; a dry run could not look (not "no drift").
        return 3 if args.dry_run else 0
    kind = "dry run (nothing changed)" if report.dry_run else "repair"
    window = f"changed in the last {since}" if since else "all chats"
    print(f"reconcile #{report.run_id}: {kind}, {window}")
    if report.killed_runs:
        found = ", ".join(f"#{run}" for run in report.killed_runs)
        print(f"earlier runs found unfinished, marked killed: {found}")
    verbs = (
        ("missing", "stale", "extra") if report.dry_run else ("inserted", "updated", "soft-deleted")
    )
    print(
        _table(
            [
                "chats",
                "messages",
                "bad elements",
                *verbs,
                "drift",
                "behind",
                "timed out",
                "skipped",
                "seconds",
            ],
            [
                [
                    report.chats,
                    report.messages,
                    report.bad_elements,
                    report.inserted,
                    report.updated,
                    report.soft_deleted,
                    report.drift,
                    report.behind,
                    report.timed_out,
                    report.skipped,
                    report.seconds,
                ]
            ],
        )
    )
    if report.behind:
        print(_behind_note(report.behind, repaired=not report.dry_run))
    if report.stalled:
        print(_stalled_note(report.stalled, report.phase, repaired=not report.dry_run))
    if report.timed_out:
        print(
            f"{report.timed_out} chats timed out alone (lock or statement timeout) and were not "
            "checked" + ("" if report.dry_run else "; each has a reconcile_timeout dead letter")
        )
    if report.skipped:
        print(
            f"{report.skipped} chats skipped: they have an open worker_lost dead letter "
            "(replay them once the cause is fixed)"
        )
    if report.dry_run and report.drift:
        return 1
    # A dry run that could not compare every chat cannot say "no drift".
    return 3 if report.dry_run and report.unchecked else 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    with _sessions() as factory:
        if args.action == "list":
            with transaction(factory) as session:
                letters = dead_letters.list_(session, include_resolved=args.all, limit=args.limit)
            rows = [
                [
                    d.id,
                    d.reason,
                    d.task,
                    d.chat_id,
                    d.attempts,
                    d.first_seen,
                    d.last_seen,
                    "resolved" if d.resolved_at else "replayed" if d.replayed_at else "open",
                    d.error[:60],
                ]
                for d in letters
            ]
            print(
                _table(
                    [
                        "id",
                        "reason",
                        "task",
                        "chat",
                        "attempts",
                        "first seen",
                        "last seen",
                        "state",
                        "error",
                    ],
                    rows,
                )
            )
            print(f"{len(letters)} dead letters")
            return 0
        if not args.ids and not args.all:
            _tell("error: replay needs dead letter ids or --all", logging.ERROR)
            return 2
        jobs = JobQueue()
        with transaction(factory) as session:
            done = replay.replay(session, jobs, None if args.all else args.ids)
        from app.broker import bounded_publisher

        failed = publish_after_commit(jobs, bounded_publisher(get_settings()))
    for item in done:
        print(f"{item.letter.id}  chat {item.letter.chat_id}: {item.action}")
    if not args.all:
        for missing in sorted(set(args.ids) - {item.letter.id for item in done}):
            print(f"{missing}: no open dead letter with this id")
    if not done:
        print("nothing to replay")
        return 0
    print(f"{len(done)} replayed" + (f", {failed} could not be enqueued" if failed else ""))
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from app.broker import queue_lengths, workers_seen

    with _sessions() as factory, transaction(factory) as session:
        gauges = status.database_gauges(session)
        runs = reconcile_runs.recent(session, limit=5)
        copied = backfill.progress(session)
        fleet_copy = bulk_passes.progress(session, bulk_passes.Kind.BACKFILL)
        rolling = bulk_passes.progress(session, bulk_passes.Kind.RECONCILE)
        paused = bulk_paused.paused(session)
    # The database's view first: it answers even when the broker does not.
    if fleet_copy is not None:
        print(_pass_line("backfill", fleet_copy))
    elif copied is not None:
        print(_backfill_line(copied))
    if rolling is not None:
        print(_pass_line("rolling reconcile", rolling))
    print(queue_lengths(get_settings()).line())
    workers = workers_seen(get_settings(), timeout=1.0)
    print(f"workers seen: {len(workers)}" + (f" ({', '.join(workers)})" if workers else ""))
    phase = gauges["phase"]
    print(
        f"phase: {phase['phase']} for {_age(timedelta(seconds=phase['held_seconds']))}"
        + (f" (a step to {phase['pending']} is pending)" if phase["pending"] else "")
    )
    if phase["contracted"]:
        print("migration: complete (contracted: the JSONB column is gone)")
    else:
        for gate in phase["gates"]:
            print(
                f"  gate to {phase['next']}: [{'ok' if gate['ok'] else 'no'}] "
                f"{gate['name']}: {gate['detail']}"
            )
        if phase["phase"] == Phase.TABLE_ONLY.value:
            print(f"reverse sync backlog: {phase['reverse_backlog']} chats (JSONB behind rows)")
    print(f"chats behind: {gauges['chats_behind']}")
    oldest = gauges["oldest_behind_seconds"]
    print(
        "oldest behind: "
        + (_age(timedelta(seconds=oldest)) if oldest else "none")
        + " (not counting dead-lettered chats)"
    )
    open_letters = gauges["dead_letters_open"]
    print(
        f"dead letters open: {sum(open_letters.values())}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in sorted(open_letters.items()))})"
            if open_letters
            else ""
        )
    )
    if runs:
        now = datetime.now(UTC)
        print("recent reconciles:")
        print(
            _table(
                [
                    "id",
                    "started",
                    "age",
                    "window",
                    "dry run",
                    "outcome",
                    "chats",
                    "drift",
                    "behind",
                    "timed out",
                    "skipped",
                    "seconds",
                ],
                [
                    [
                        r.id,
                        r.started_at,
                        _age(now - r.started_at),
                        r.since or "all",
                        r.dry_run,
                        r.outcome,
                        r.chats_scanned,
                        r.drift,
                        r.chats_behind,
                        r.chats_timed_out,
                        r.chats_skipped,
                        r.duration_seconds,
                    ]
                    for r in runs
                ],
            )
        )
    else:
        print("recent reconciles: none yet")
    print(_bulk_line(paused))
    return 0


def _backfill_line(copied: backfill.Progress) -> str:
    # The words of the backfill's own log lines (`migrations/backfill.py`).
    if copied.finished_at is not None:
        return (
            f"backfill: done: {copied.total_chats} chats; copied {copied.rows_copied} messages; "
            f"skipped {copied.bad_elements} bad elements and {copied.bad_chats} chats whose "
            "messages is not an array"
        )
    return (
        f"backfill: {copied.chats_done}/{copied.total_chats} chats ({copied.percent:.1f}%), "
        f"{copied.rows_copied} rows; not finished: `alembic upgrade head` resumes it"
    )


def _pass_line(name: str, p: bulk_passes.PassProgress) -> str:
    """One line per bulk pass: chunks done/total, chats, rows, rate, ETA (the same words for
    the backfill and the rolling reconcile)."""
    elapsed = p.elapsed_seconds
    rate = p.rows / elapsed if elapsed > 0 else 0.0
    eta = bulk_passes_service.eta_seconds(p)
    line = (
        f"{name}: pass #{p.id} {p.state}: {p.chunks_done}/{p.total_chunks} chunks, "
        f"{p.chats}/{p.total_chats} chats, {p.rows} rows, {rate:.0f} rows/s"
    )
    if p.state == "finished":
        line += f", done in {_age(timedelta(seconds=elapsed))}"
    elif eta is not None:
        line += f", ETA {_age(timedelta(seconds=eta))}"
    else:
        line += ", ETA unknown"
    if p.chunks_running:
        line += f"; {p.chunks_running} running"
    if p.chunks_failed:
        line += f"; {p.chunks_failed} failed (`python -m app {name.split()[-1]} resume` retries)"
    if p.kind is bulk_passes.Kind.RECONCILE:
        line += (
            f"; released {p.released_chunks}/{p.total_chunks} (1/{p.nights} a night); "
            f"drift {p.drift} repaired, {p.behind} behind, {p.timed_out} timed out, "
            f"{p.skipped} skipped"
        )
    elif p.bad_elements or p.bad_chats:
        line += f"; skipped {p.bad_elements} bad elements and {p.bad_chats} chats"
    return line


def cmd_backfill(args: argparse.Namespace) -> int:
    """`backfill resume`: record the fleet backfill if the migration left one, retry its failed
    chunks, and queue chunks up to the fleet's cap (what beat's dispatch also does)."""
    settings = get_settings()
    with _sessions() as factory:
        with transaction(factory) as session:
            pass_id = bulk_passes_service.start_backfill(session, settings, trigger="cli")
            if pass_id is None:
                pass_id = bulk_passes.open_pass(session, bulk_passes.Kind.BACKFILL)
            retried = bulk_passes.retry_failed(session, pass_id) if pass_id is not None else 0
        if pass_id is None:
            print("backfill: nothing to resume (no fleet backfill open)")
            return 0
        from app.broker import bounded_publisher

        sent = bulk_passes_service.dispatch_and_publish(
            factory, settings, bounded_publisher(settings).many
        )
        with transaction(factory) as session:
            progress = bulk_passes.progress(session, bulk_passes.Kind.BACKFILL)
    if retried:
        print(f"backfill: {retried} failed chunks retried")
    print(f"backfill: {sent} chunks queued")
    if progress is not None:
        print(_pass_line("backfill", progress))
    return 0


def _bulk_line(paused: dict[bulk_paused.Pass, bulk_paused.Paused]) -> str:
    return "bulk passes: " + ", ".join(
        f"{name.value} paused by {paused[name].paused_by} since "
        f"{paused[name].paused_at:%Y-%m-%d %H:%M:%S} UTC"
        if name in paused
        else f"{name.value} running"
        for name in bulk_paused.Pass
    )


def cmd_bulk(args: argparse.Namespace) -> int:
    try:
        names = [bulk_paused.Pass(name) for name in args.passes]
    except ValueError as exc:
        known = ", ".join(p.value for p in bulk_paused.Pass)
        _tell(f"error: passes: {exc}; passes: {known}", logging.ERROR)
        return 2
    with _sessions() as factory, transaction(factory) as session:
        if args.action == "pause":
            changed = bulk.pause(session, names, who=_who())
        elif args.action == "resume":
            changed = bulk.resume(session, names, who=_who())
        else:
            changed = []
        paused = bulk_paused.paused(session)
    for name in names or list(bulk_paused.Pass):
        if args.action == "pause":
            print(f"{name.value}: " + ("paused" if name in changed else "was paused already"))
        elif args.action == "resume":
            print(f"{name.value}: " + ("resumed" if name in changed else "was not paused"))
    print(_bulk_line(paused))
    return 0


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _print_phase(session: Session) -> Phase:
    """The phase, since when, what is pending, and the gates of the next step forward."""
    settings = get_settings()
    state = phase_repo.current(session)
    held = _age(timedelta(seconds=state.held_seconds))
    print(f"since: {state.since:%Y-%m-%d %H:%M:%S} UTC ({held})")
    if state.contracted:
        print(f"contracted: {state.contracted_at:%Y-%m-%d %H:%M:%S} UTC: the migration is complete")
    if state.pending is not None:
        print(
            f"pending: a step to {state.pending.value} started at "
            f"{state.pending_since:%Y-%m-%d %H:%M:%S} UTC and did not finish; "
            f"`phase set {state.pending.value}` finishes it, "
            f"`phase set {state.phase.value}` undoes it"
        )
    following = phase_service.next_forward(state.phase)
    if following is not None and not state.contracted:
        print(f"gates to {following.value}:")
        for gate in phase_service.gates(session, settings, state, following):
            print(f"  [{'ok' if gate.ok else 'no'}] {gate.name}: {gate.detail}")
    changes = phase_repo.history(session, limit=5)
    if changes:
        print("recent changes:")
        print(
            _table(
                ["at", "who", "from", "to", "forced"],
                [[c.at, c.who, c.from_phase, c.to_phase, c.forced] for c in changes],
            )
        )
    print(f"phase: {state.phase.value}")
    return state.phase


def cmd_phase(args: argparse.Namespace) -> int:
    settings = get_settings()
    with _sessions() as factory:
        if args.action is None:
            with transaction(factory) as session:
                _print_phase(session)
            return 0
        try:
            target = Phase(args.name)
        except ValueError:
            _tell(
                f"error: unknown phase {args.name!r}; phases, in order: "
                + ", ".join(p.value for p in Phase),
                logging.ERROR,
            )
            return 2
        try:
            moved = phase_service.set_phase(
                factory,
                settings,
                target,
                who=_who(),
                force=args.force,
                progress=_tell,
            )
        except phase_service.Refused as refused:
            _tell(f"refused: {refused}; nothing changed", logging.ERROR)
            return 1
    if moved.from_phase is moved.to:
        print(f"already in {moved.to.value}; no step pending")
    else:
        forced = f" (forced past: {', '.join(g.name for g in moved.failed_gates)})"
        print(
            f"moved {moved.from_phase.value} -> {moved.to.value}"
            + (forced if moved.forced else "")
            + (f"; {moved.caught_up} chats caught up first" if moved.caught_up else "")
        )
    print(f"phase: {moved.to.value}")
    return 0


def cmd_contract(args: argparse.Namespace) -> int:
    settings = get_settings()
    if not args.yes:
        if not sys.stdin.isatty():
            _tell(
                "refused: the contract drops the JSONB column for good and asks for "
                "confirmation on a terminal; pass --yes to confirm from a script",
                logging.ERROR,
            )
            return 2
        answer = input("Drop copilot_chats.messages for good? There is no way back. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing done")
            return 1
    with _sessions() as factory:
        try:
            phase_service.contract(factory, settings, who=_who())
        except phase_service.Refused as refused:
            _tell(f"refused: {refused}; nothing dropped", logging.ERROR)
            return 1
    print("contracted: copilot_chats.messages dropped; the migration is complete")
    return 0


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return number


def token_ttl(value: str) -> int:
    seconds = positive_int(value)
    if seconds > MAX_TTL_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{value} seconds is longer than the longest token lifetime, {MAX_TTL_SECONDS} "
            f"seconds ({MAX_TTL_SECONDS // 86400} days)"
        )
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    token = commands.add_parser("token", help="print a bearer token for USER")
    token.add_argument("user")
    token.add_argument("--admin", action="store_true", help="the token may import chats")
    token.add_argument(
        "--ttl",
        type=token_ttl,
        default=86400,
        help=f"seconds the token is valid (default 86400, at most {MAX_TTL_SECONDS})",
    )
    token.set_defaults(func=cmd_token)

    check = commands.add_parser("check", help="print drift between JSONB and table; exit 1 if any")
    check.add_argument("--batch-size", type=positive_int, default=500)
    check.set_defaults(func=cmd_check)

    rec = commands.add_parser("reconcile", help="repair drift (exit 1 on drift with --dry-run)")
    rec.add_argument("--since", help="only chats changed within this interval, e.g. '7 days'")
    rec.add_argument("--dry-run", action="store_true", help="report drift, change nothing")
    rec.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="chats per transaction (default: RECONCILE_BATCH_SIZE, 200)",
    )
    rec.set_defaults(func=cmd_reconcile)

    dead = commands.add_parser("dead-letters", help="list or replay syncs that gave up")
    actions = dead.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="open dead letters (--all: resolved ones too)")
    listing.add_argument("--all", action="store_true")
    listing.add_argument("--limit", type=positive_int, default=100)
    again = actions.add_parser(
        "replay",
        help="re-run the sync of these dead letters (bad_elements: converged here, at once)",
    )
    again.add_argument("ids", nargs="*", type=int)
    again.add_argument("--all", action="store_true", help="every open dead letter")
    dead.set_defaults(func=cmd_dead_letters)

    stat = commands.add_parser("status", help="queues, workers, backlog, dead letters, reconciles")
    stat.set_defaults(func=cmd_status)

    phase = commands.add_parser("phase", help="the rollout phase and its gates; `set` moves it")
    phase.set_defaults(func=cmd_phase, action=None)
    steps = phase.add_subparsers(dest="action")
    step = steps.add_parser("set", help="move one step, forward or back")
    step.add_argument("name", help="one of: " + ", ".join(p.value for p in Phase))
    step.add_argument("--force", action="store_true", help="skip the gates (recorded)")

    passes = ", ".join(p.value for p in bulk_paused.Pass)
    bulk_ = commands.add_parser(
        "bulk", help="the scheduled bulk passes (reconciles); `pause`/`resume` them"
    )
    bulk_.set_defaults(func=cmd_bulk, action=None, passes=[])
    bulk_actions = bulk_.add_subparsers(dest="action")
    for verb, what in (("pause", "skip scheduled runs of"), ("resume", "run again")):
        act = bulk_actions.add_parser(verb, help=f"{what} these passes (default: all)")
        act.add_argument("passes", nargs="*", metavar="PASS", help=f"one of: {passes}")

    fill = commands.add_parser(
        "backfill", help="the fleet backfill (BACKFILL_ON_WORKERS): `resume` queues its chunks"
    )
    fill.set_defaults(func=cmd_backfill)
    fill_actions = fill.add_subparsers(dest="action", required=True)
    fill_actions.add_parser("resume", help="queue the backfill's chunks; retry failed ones")

    contract = commands.add_parser("contract", help="drop the JSONB column (table_only only)")
    contract.add_argument("--yes", action="store_true", help="confirm without a terminal")
    contract.set_defaults(func=cmd_contract)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Log lines follow LOG_FORMAT on stderr; what a command prints for its reader does not.
    logs.configure()
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
