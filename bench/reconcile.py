"""Reconcile against the migration's inline backfill on the reference data set, in one run:
(a) the backfill's one statement (`migrations.backfill.INLINE`) into an empty table, (b) again
with every row there, (c) `python -m app reconcile`'s code into the emptied table, (d) again, in
sync. Targets: (c) <= 1.5 x (a), (d) <= 1.5 x (b); where one is missed (or with --explain), the
time per statement kind and the plan of one converge batch go to bench/out/.

    .venv/bin/python -m bench.reconcile [--scale 1.0] [--runs 3] [--batch-size 200] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import psycopg
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from app.services.reconcile import reconcile
from bench import dataset, infra
from migrations.backfill import INLINE

TARGETS = {"c": ("a", 1.5), "d": ("b", 1.5)}
STEPS = {
    "a": "(a) inline backfill, empty table",
    "b": "(b) inline backfill, all rows exist",
    "c": "(c) reconcile, empty table",
    "d": "(d) reconcile, in sync",
}
REFERENCES = {"a": "14-17 s ref.", "b": "~2.8 s ref."}
KINDS = (  # statement marker -> what it is, for the time per statement kind
    ("upserted AS", "converge (one statement per batch)"),
    ("AS equal", "cheap comparison (clears in-sync chats)"),
    ("pg_advisory_xact_lock", "per-chat advisory locks"),
    ("SELECT id FROM copilot_chats", "next batch of chat ids"),
    ("copilot_chat_sync_state", "sync state"),
    ("dualwrite_dead_letters", "dead letters"),
    ("dualwrite_reconcile_runs", "reconcile run record"),
)


class StatementClock:
    """Time spent in the database per kind of statement, from SQLAlchemy's cursor events; keeps
    the last converge statement run, and the last cheap comparison, for their plans."""

    def __init__(self, engine: Any) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._started = 0.0
        self.converge: tuple[str, Any] = ("", None)
        self.comparison: tuple[str, Any] = ("", None)

        @event.listens_for(engine, "before_cursor_execute")
        def before(*_: Any) -> None:
            self._started = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            kind = next((k for marker, k in KINDS if marker in statement), "other")
            if kind == KINDS[0][1] and not statement.startswith("EXPLAIN"):
                self.converge = (statement, parameters)
            if kind == KINDS[1][1] and not statement.startswith("EXPLAIN"):
                self.comparison = (statement, parameters)
            self.seconds[kind] += time.perf_counter() - self._started
            self.calls[kind] += 1

    def rows(self, total: float) -> list[list[Any]]:
        """The time per kind of the statements since the last call, against `total` seconds."""
        rows: list[list[Any]] = [
            [kind, self.calls[kind], seconds, f"{seconds / total:.0%}"]
            for kind, seconds in sorted(self.seconds.items(), key=lambda item: -item[1])
        ]
        outside = total - sum(self.seconds.values())
        self.seconds.clear()
        self.calls.clear()
        return [
            *rows,
            ["outside statements (commits, Python)", "", outside, f"{outside / total:.0%}"],
        ]


def sql(url: str, *statements: str) -> float:
    """Statements in one transaction (after a checkpoint of earlier writes); seconds taken."""
    infra.scalar(url, "CHECKPOINT")
    with psycopg.connect(url) as connection:
        connection.execute("SET timezone = 'UTC'")
        started = time.perf_counter()
        for statement in statements:
            connection.execute(statement)
        connection.commit()
        return time.perf_counter() - started


def run_reconcile(factory: Any, url: str, batch_size: int) -> tuple[float, Any]:
    """Seconds and the report of the reconcile (or the error of a batch past the timeout)."""
    infra.scalar(url, "CHECKPOINT")
    started = time.perf_counter()
    try:
        report = reconcile(factory, batch_size=batch_size, trigger="bench")
    except OperationalError as exc:
        return time.perf_counter() - started, str(exc.orig).strip().splitlines()[0]
    if report is None:
        raise SystemExit("reconcile: lock is held (another reconcile on this database?)")
    return time.perf_counter() - started, report


def explain(factory: Any, converge: tuple[str, Any], path: Any, clock_rows: list[Any]) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of a statement the reconcile ran (converge, or the cheap
    comparison), rolled back."""
    statement, parameters = converge
    with factory() as session:
        session.execute(text("SET LOCAL statement_timeout = 0"))  # the slow plan is the one wanted
        explained = session.connection().exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
        )
        plan = [r[0] for r in explained]
        session.rollback()
    headers = ["statement", "calls", "seconds", "share"]
    path.write_text(
        f"## time per statement kind, whole run\n{infra.table(headers, clock_rows)}\n\n"
        "## the last batch's converge statement (in sync: its cheap comparison), rolled back\n"
        + "\n".join(plan)
        + "\n"
    )
    print(f"plans: {path.relative_to(infra.ROOT)}")


def measure(url: str, args: argparse.Namespace, expected: int) -> dict[str, Any]:
    """Rounds of (a)-(d): the seconds of each step, the problems seen, and the time per
    statement kind of the last (c) and (d), with their plans where a target is missed."""
    truncate = "TRUNCATE copilot_chat_messages, copilot_chat_sync_state"
    out: dict[str, Any] = {"seconds": {k: [] for k in STEPS}, "problems": [], "clocks": {}}
    out["failed"], converge = Counter(), {}
    with infra.sessions(url, worker=True, pool_size=2) as factory:
        clock = StatementClock(factory.kw["bind"])
        for run in range(args.runs):
            print(f"round {run + 1} of {args.runs}", file=sys.stderr)
            sql(url, truncate)
            out["seconds"]["a"].append(sql(url, INLINE))
            out["seconds"]["b"].append(sql(url, INLINE))
            sql(url, truncate)
            for step in "cd":
                seconds, report = run_reconcile(factory, url, args.batch_size)
                out["seconds"][step].append(seconds)
                # In sync, the cheap comparison is (nearly) all the reconcile runs: its plan.
                last = clock.comparison if step == "d" else clock.converge
                out["clocks"][step], converge[step] = clock.rows(seconds), last
                copied = infra.scalar(url, "SELECT count(*) FROM copilot_chat_messages")
                if isinstance(report, str):
                    out["failed"][step] += 1
                if isinstance(report, str) or copied != expected or (step == "d" and report.drift):
                    out["problems"].append(
                        f"({step}) round {run + 1} after {seconds:.0f}s: {report}"
                    )
        for step in "dc":  # the table is in sync now: (d) first, then (c) on an empty one
            ref, target = TARGETS[step]
            ratio = statistics.median(out["seconds"][step]) / statistics.median(out["seconds"][ref])
            if ratio > target or args.explain:
                if step == "c":
                    sql(url, truncate)
                path = infra.OUT / f"reconcile-explain-{step}{args.suffix}.txt"
                explain(factory, converge[step], path, out["clocks"][step])
    return out


def report(out: dict[str, Any], expected: int, args: argparse.Namespace) -> None:
    median = {k: statistics.median(v) for k, v in out["seconds"].items()}
    infra.show(
        f"seconds per step ({expected:,} messages; reconcile batches of {args.batch_size})",
        ["step", *infra.STATS, "rows/s", "reference"],
        [
            [name, *infra.stats(out["seconds"][k]), expected / median[k], REFERENCES.get(k, "")]
            for k, name in STEPS.items()
        ],
    )
    rows = []
    for step, (ref, target) in TARGETS.items():
        ratio, failed = median[step] / median[ref], out["failed"][step]
        outcome = f"MISSED: {failed} run(s) failed" if failed else infra.verdict(ratio, target)
        rows.append(
            [
                f"({step}) / ({ref})",
                f"{ratio:.2f}x",
                f"{median[ref]:.2f} s",
                f"<= {target}x",
                outcome,
            ]
        )
    infra.show("targets, against the backfill measured in this run (medians)", infra.FIGURE, rows)
    for step, clock_rows in out["clocks"].items():
        infra.show(
            f"where the last {STEPS[step]} spent its time",
            ["statement", "calls", "seconds", "share"],
            clock_rows,
        )
    for problem in out["problems"]:
        print(f"PROBLEM: {problem}")


def main() -> int:
    args = infra.options(
        __doc__,
        {"scale": 0.01, "runs": 1},
        scale=(1.0, "of the reference data set"),
        runs=(3, "rounds of (a)-(d)"),
        batch_size=(200, "chats per reconcile batch"),
        explain=(False, "write the plans even if met"),
    )
    args.suffix = "" if args.scale == 1.0 else f"-scale-{args.scale:g}"  # CI keeps real plans
    with infra.database("cdw_bench_reconcile") as url:
        loaded = dataset.load(url, dataset.shape(args.scale))
        print(f"data set: {loaded.chats:,} chats, {loaded.messages:,} messages", file=sys.stderr)
        out = measure(url, args, loaded.messages)
    report(out, loaded.messages, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
