"""Reconcile vs the migration's inline backfill, on the reference data set, in the same run:

  (a) the backfill's copy as one statement (`migrations.backfill.INLINE`) into an empty table;
  (b) the same statement again, every row already there;
  (c) the table truncated, then the reconcile (`python -m app reconcile`'s code) into it;
  (d) the reconcile again, everything in sync.

Targets: (c) <= 1.5 x (a) and (d) <= 2 x (b). Where one is missed, `EXPLAIN (ANALYZE, BUFFERS)` of
one batch of the converge statement (and of the backfill restricted to the same chats) goes to
bench/out/ with the time per statement kind, to show where the time goes.

    .venv/bin/python bench/reconcile.py [--scale 1.0] [--runs 3] [--batch-size 500[,2000...]]
                                        [--explain] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dataset, infra
from migrations.backfill import INLINE

TARGET_EMPTY = 1.5
TARGET_IN_SYNC = 2.0


class StatementClock:
    """Time spent in the database per kind of statement, from SQLAlchemy's cursor events."""

    KINDS = (
        ("upserted AS", "converge (one statement per batch)"),
        ("pg_advisory_xact_lock", "per-chat advisory locks"),
        ("SELECT id FROM copilot_chats", "next batch of chat ids"),
        ("copilot_chat_sync_state", "sync state (mark applied)"),
        ("dualwrite_dead_letters", "dead letters (resolve)"),
        ("dualwrite_reconcile_runs", "reconcile run record"),
    )

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._started: dict[int, float] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self._started[id(cursor)] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            elapsed = time.perf_counter() - self._started.pop(id(cursor), time.perf_counter())
            kind = next((k for marker, k in self.KINDS if marker in statement), "other")
            self.seconds[kind] += elapsed
            self.calls[kind] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


@contextmanager
def app_sessions(database_url: str) -> Iterator[tuple[Any, StatementClock]]:
    """A session factory built as `python -m app reconcile` builds its own."""
    from app.db import make_engine, make_sessionmaker
    from app.settings import Settings

    engine = make_engine(Settings(database_url=database_url), worker=True, pool_size=2)
    try:
        yield make_sessionmaker(engine), StatementClock(engine)
    finally:
        engine.dispose()


def checkpoint(database_url: str) -> None:
    """Start every measured step without a pending checkpoint of the previous step's writes."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("CHECKPOINT")


def truncate(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("TRUNCATE copilot_chat_messages, copilot_chat_sync_state")
        connection.execute("VACUUM ANALYZE copilot_chats")


def run_backfill(database_url: str, statement: str) -> tuple[float, int]:
    """The migration's statement in one transaction, as `alembic upgrade` runs it."""
    checkpoint(database_url)
    with psycopg.connect(database_url) as connection:
        connection.execute("SET timezone = 'UTC'")
        started = time.perf_counter()
        rows = connection.execute(statement).rowcount
        connection.commit()
        return time.perf_counter() - started, rows


def run_reconcile(
    factory: Any, clock: StatementClock, database_url: str, batch_size: int
) -> tuple[float, Any, list[float]]:
    from app.services.reconcile import reconcile

    checkpoint(database_url)
    clock.reset()
    batches: list[float] = []
    last = [time.perf_counter()]

    def progress(report: Any) -> None:
        now = time.perf_counter()
        batches.append(now - last[0])
        last[0] = now

    from sqlalchemy.exc import OperationalError

    started = time.perf_counter()
    try:
        report = reconcile(factory, batch_size=batch_size, trigger="bench", progress=progress)
    except OperationalError as exc:
        # A batch over the worker's statement timeout fails the whole run, as it would for
        # `python -m app reconcile`: a result to report (with its plan), not a crash.
        seconds = time.perf_counter() - started
        batches.append(time.perf_counter() - last[0])
        return seconds, str(exc.orig).strip().splitlines()[0], batches
    seconds = time.perf_counter() - started
    if report is None:
        raise SystemExit("reconcile: lock is held (another reconcile on this database?)")
    return seconds, report, batches


def explain(
    database_url: str,
    factory: Any,
    backfill: str,
    batch_size: int,
    label: str,
    clock_rows: list[list[Any]],
) -> Path:
    """EXPLAIN (ANALYZE, BUFFERS) of one batch of the converge statement and of the backfill
    restricted to the same chats, each in a rolled-back transaction."""
    from sqlalchemy import bindparam, text
    from sqlalchemy.dialects.postgresql import ARRAY, UUID

    from app.repositories import chats as chats_repo
    from app.repositories import messages as messages_repo

    path = infra.OUT / f"reconcile-explain-{label}.txt"
    infra.OUT.mkdir(parents=True, exist_ok=True)
    with factory() as session:
        ids = chats_repo.ids_after(session, None, batch_size)
        session.rollback()
        # The plan of a batch that runs past the worker's statement timeout is the one wanted.
        session.execute(text("SET LOCAL statement_timeout = 0"))
        converge = text(
            "EXPLAIN (ANALYZE, BUFFERS, TIMING) " + messages_repo._CONVERGE.text
        ).bindparams(bindparam("chat_ids", type_=ARRAY(UUID(as_uuid=True))))
        plan_converge = [r[0] for r in session.execute(converge, {"chat_ids": sorted(ids)})]
        session.rollback()
    restricted, found = re.subn(
        r"\nWHERE(\s+)jsonb_typeof\(e\.elem\)",
        r"\nWHERE c.id = ANY(%(ids)s) AND\1jsonb_typeof(e.elem)",
        backfill,
        count=1,
    )
    if not found:
        raise SystemExit("could not restrict the backfill statement to one batch")
    with psycopg.connect(database_url) as connection:
        connection.execute("SET timezone = 'UTC'")
        plan_backfill = [
            r[0]
            for r in connection.execute(
                "EXPLAIN (ANALYZE, BUFFERS, TIMING) " + restricted, {"ids": list(ids)}
            )
        ]
        connection.rollback()
    with path.open("w") as out:
        out.write(f"# {label}: one batch of {len(ids)} chats (the first in id order)\n\n")
        out.write("## time per statement kind over the whole reconcile run\n")
        out.write(infra.table(["statement", "calls", "seconds", "share"], clock_rows) + "\n\n")
        out.write("## converge statement (app/repositories/messages.py), rolled back\n")
        out.write("\n".join(plan_converge) + "\n\n")
        out.write("## the inline backfill of 0002 restricted to the same chats, rolled back\n")
        out.write("\n".join(plan_backfill) + "\n")
    return path


def clock_table(clock: StatementClock, total: float) -> list[list[Any]]:
    rows: list[list[Any]] = [
        [kind, clock.calls[kind], round(seconds, 2), f"{seconds / total:.0%}"]
        for kind, seconds in clock.seconds.most_common()
    ]
    outside = total - sum(clock.seconds.values())
    rows.append(
        ["outside statements (commits, Python)", "", round(outside, 2), f"{outside / total:.0%}"]
    )
    return rows


def stats_row(name: str, seconds: list[float], rows: int, reference: str) -> list[Any]:
    median = statistics.median(seconds)
    return [
        name,
        len(seconds),
        round(median, 3),
        round(infra.percentile(seconds, 50), 3),
        round(infra.percentile(seconds, 99), 3),
        round(min(seconds), 3),
        round(max(seconds), 3),
        rows,
        round(rows / median),
        reference,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="of the reference data set")
    parser.add_argument("--runs", type=int, default=3, help="rounds of (a)-(d)")
    parser.add_argument(
        "--batch-size",
        default="500",
        help="chats per reconcile batch; a comma list tries several in the same run",
    )
    parser.add_argument("--explain", action="store_true", help="write the plans even if met")
    parser.add_argument("--quick", action="store_true", help="scale 0.01, one round")
    args = parser.parse_args()
    if args.quick:
        args.scale, args.runs = 0.01, 1
    batch_sizes = [int(b) for b in args.batch_size.split(",")]

    infra.services_up()
    statement = INLINE
    with infra.database("cdw_bench_reconcile") as url:
        os.environ["DATABASE_URL"] = url
        shape = dataset.shape(args.scale)
        loaded = dataset.load(url, shape)
        print(
            f"data set: {loaded.chats:,} chats, {loaded.messages:,} messages, "
            f"{loaded.json_bytes / 1e6:,.0f} MB of JSON, loaded in {loaded.seconds:.1f}s",
            file=sys.stderr,
        )
        expected = loaded.messages
        times: dict[str, list[float]] = {}
        batch_times: dict[str, list[float]] = {}
        clocks: dict[str, list[list[Any]]] = {}
        problems: list[str] = []
        failures: dict[str, int] = {}

        def record(key: str, seconds: float) -> None:
            times.setdefault(key, []).append(seconds)
            print(f"  {key}: {seconds:.2f}s", file=sys.stderr)

        with app_sessions(url) as (factory, clock):
            for run in range(args.runs):
                print(f"round {run + 1} of {args.runs}", file=sys.stderr)
                truncate(url)
                seconds, rows = run_backfill(url, statement)
                if rows != expected:
                    problems.append(f"(a) inserted {rows} rows, expected {expected}")
                record("a", seconds)
                seconds, rows = run_backfill(url, statement)
                if rows != 0:
                    problems.append(f"(b) inserted {rows} rows, expected 0")
                record("b", seconds)
                for size in batch_sizes:
                    truncate(url)
                    seconds, report, batches = run_reconcile(factory, clock, url, size)
                    if isinstance(report, str):
                        failures[f"c{size}"] = failures.get(f"c{size}", 0) + 1
                        problems.append(
                            f"(c) round {run + 1} FAILED after {seconds:.0f}s: {report}"
                        )
                    elif report.inserted != expected or report.updated or report.soft_deleted:
                        problems.append(f"(c) batch {size}: {report}")
                    record(f"c{size}", seconds)
                    batch_times.setdefault(f"c{size}", []).extend(batches)
                    clocks[f"c{size}"] = clock_table(clock, seconds)
                    seconds, report, batches = run_reconcile(factory, clock, url, size)
                    if isinstance(report, str):
                        failures[f"d{size}"] = failures.get(f"d{size}", 0) + 1
                        problems.append(
                            f"(d) round {run + 1} FAILED after {seconds:.0f}s: {report}"
                        )
                    elif report.drift or report.messages != expected:
                        problems.append(f"(d) batch {size}: {report}")
                    record(f"d{size}", seconds)
                    batch_times.setdefault(f"d{size}", []).extend(batches)
                    clocks[f"d{size}"] = clock_table(clock, seconds)

            a, b = statistics.median(times["a"]), statistics.median(times["b"])
            rows_out = [
                stats_row("(a) inline backfill, empty table", times["a"], expected, "14-17 s ref."),
                stats_row(
                    "(b) inline backfill, all rows exist", times["b"], expected, "~2.8 s ref."
                ),
            ]
            ratios: list[list[Any]] = []
            wanted: list[tuple[str, int]] = []
            # Quick runs (CI) must not overwrite the plans of a real measurement.
            suffix = "" if args.scale == 1.0 else f"-scale-{args.scale:g}"

            def failed_note(key: str) -> str:
                n = failures.get(key, 0)
                return f"; {n} run(s) FAILED: statement timeout" if n else ""

            for size in batch_sizes:
                c, d = statistics.median(times[f"c{size}"]), statistics.median(times[f"d{size}"])
                rows_out.append(
                    stats_row(
                        f"(c) reconcile, empty table, batch {size}",
                        times[f"c{size}"],
                        expected,
                        f"<= {TARGET_EMPTY} x (a)" + failed_note(f"c{size}"),
                    )
                )
                rows_out.append(
                    stats_row(
                        f"(d) reconcile, in sync, batch {size}",
                        times[f"d{size}"],
                        expected,
                        f"<= {TARGET_IN_SYNC} x (b)" + failed_note(f"d{size}"),
                    )
                )
                for step, ratio, target in (
                    ("c", c / a, TARGET_EMPTY),
                    ("d", d / b, TARGET_IN_SYNC),
                ):
                    met = ratio <= target and not failures.get(f"{step}{size}")
                    ratios.append(
                        [
                            f"({step})/({'a' if step == 'c' else 'b'}) batch {size}",
                            f"{ratio:.2f}x",
                            f"<= {target}x",
                            f"MISSED: {failures[f'{step}{size}']} run(s) failed"
                            if failures.get(f"{step}{size}")
                            else "met"
                            if met
                            else f"MISSED by {ratio / target - 1:.0%}",
                        ]
                    )
                    if not met or args.explain:
                        wanted.append((step, size))
            # The table is in sync now: those plans first, then the empty-table ones.
            explains = [
                explain(
                    url,
                    factory,
                    statement,
                    size,
                    f"in-sync-batch-{size}{suffix}",
                    clocks[f"d{size}"],
                )
                for step, size in wanted
                if step == "d"
            ]
            if any(step == "c" for step, _ in wanted):
                truncate(url)
                explains += [
                    explain(
                        url,
                        factory,
                        statement,
                        size,
                        f"empty-batch-{size}{suffix}",
                        clocks[f"c{size}"],
                    )
                    for step, size in wanted
                    if step == "c"
                ]

        headers = [
            "step",
            "runs",
            "median s",
            "p50 s",
            "p99 s",
            "min s",
            "max s",
            "rows",
            "rows/s",
            "reference/target",
        ]
        print(infra.table(headers, rows_out))
        print()
        print(infra.table(["ratio (medians, same run)", "measured", "target", "outcome"], ratios))
        print()
        batch_rows = []
        for key, values in batch_times.items():
            step = "(c) empty" if key.startswith("c") else "(d) in sync"
            batch_rows.append(
                [
                    f"{step}, batch {key[1:]}",
                    len(values),
                    round(statistics.median(values), 3),
                    round(infra.percentile(values, 50), 3),
                    round(infra.percentile(values, 99), 3),
                    round(min(values), 3),
                    round(max(values), 3),
                ]
            )
        print(
            infra.table(
                ["reconcile batch", "batches", "median s", "p50 s", "p99 s", "min s", "max s"],
                batch_rows,
            )
        )
        for key, rows in clocks.items():
            print()
            step = "(c) empty table" if key.startswith("c") else "(d) in sync"
            print(f"where the last {step} reconcile spent its time (batch {key[1:]}):")
            print(infra.table(["statement", "calls", "seconds", "share"], rows))
        for path in explains:
            print(f"plans: {path.relative_to(infra.ROOT)}")
        for problem in problems:
            print(f"PROBLEM: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
