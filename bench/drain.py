"""Backlog drain: 100,000 message syncs over 2,000 chats left pending (produced as the API does:
`app.services.chats.append_inbox_pair`, published after each commit) while no worker runs, then
a worker (prefork, -c 2) started: rows/s until drift is 0, against the ceiling measured in the
same run: `app.services.sync.sync_chats` in this process over the same backlog, ~1,000 rows per
transaction (one chat per transaction for reference). Writes bench/out/drain_curve{,-quick}.*

    .venv/bin/python -m bench.drain [--messages 100000] [--chats 2000] [--quick]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from prometheus_client import REGISTRY

from app import schemas
from app.db import transaction
from app.jobs import SYNC_MESSAGES
from app.services import chats as service
from app.services.sync import sync_chats
from app.settings import get_settings
from bench import dataset, infra

TARGET = 0.5
BATCH_ROWS = 1_000
ROWS_BEHIND = (
    "SELECT (SELECT count(*) FROM copilot_chat_messages WHERE deleted_at IS NULL),"
    " (SELECT count(*) FROM copilot_chat_sync_state WHERE applied_version < wanted_version)"
)


def produce(running: infra.Stack, args: argparse.Namespace) -> None:
    """`args.threads` clients, each creating its share of the chats, then appending its share of
    the messages to them as inbox pairs, each by the service's own unit of work."""
    from tasks.publish import bounded_publisher

    failures: list[str] = []

    def client(index: int, factory: Any) -> None:
        user, publish = f"drain-{index}", bounded_publisher(get_settings())
        rng, clock = random.Random(args.seed * 7919 + index), datetime.now(UTC)
        new = schemas.CreateChat(title="drain")
        try:
            chats = range(index, args.chats, args.threads)
            owned = [
                infra.unit_of_work(factory, publish, user, service.create_chat, new).id
                for _ in chats
            ]
            for n in range(len(range(index, args.messages // 2, args.threads))):
                clock += timedelta(milliseconds=rng.randint(1, 3_000))
                pair = {role: dataset.element(rng, role, clock) for role in ("user", "assistant")}
                body = schemas.InboxPair.model_validate(pair)
                chat = owned[n % len(owned)]
                infra.unit_of_work(factory, publish, user, service.append_inbox_pair, chat, body)
        except Exception as exc:
            failures.append(f"client {index}: {type(exc).__name__}: {exc}")

    with infra.sessions(running.url, pool_size=args.threads, fsync=False) as factory:
        infra.in_threads(client, [(i, factory) for i in range(args.threads)])
    if failures:
        raise SystemExit("backlog producer failed: " + "; ".join(failures[:3]))


def ceiling(url: str, per_batch: int) -> tuple[list[float], float]:
    """Seconds per transaction and rows/s of `sync_chats` over every chat behind, `per_batch`
    chats per transaction; then the copy undone for the worker to do it again."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS bench_state AS SELECT * FROM copilot_chat_sync_state"
        )
        connection.execute("CHECKPOINT")
        behind = connection.execute(
            "SELECT chat_id, wanted_version FROM copilot_chat_sync_state "
            "WHERE applied_version < wanted_version ORDER BY chat_id"
        ).fetchall()
    seconds = []
    began = time.perf_counter()
    with infra.sessions(url, worker=True) as factory:
        for start in range(0, len(behind), per_batch):
            started = time.perf_counter()
            with transaction(factory) as session:
                sync_chats(session, dict(behind[start : start + per_batch]))
            seconds.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - began
    rows = infra.scalar(url, "SELECT count(*) FROM copilot_chat_messages")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("TRUNCATE copilot_chat_messages")
        connection.execute("DELETE FROM copilot_chat_sync_state")
        connection.execute("INSERT INTO copilot_chat_sync_state SELECT * FROM bench_state")
        connection.execute("VACUUM ANALYZE")
        connection.execute("CHECKPOINT")
    return seconds, rows / elapsed


def drain(running: infra.Stack, expected: int, concurrency: int) -> tuple[list[Any], float]:
    """(seconds, rows, chats behind) from the worker's launch until every row is there and no
    chat is behind, and when the worker was ready."""
    connection = psycopg.connect(running.url, autocommit=True)
    curve = infra.Poller(lambda: connection.execute(ROWS_BEHIND).fetchone(), 0.1).start()
    try:
        running.worker("drain", "-c", str(concurrency))
        ready = time.perf_counter() - curve.started

        def drained() -> bool:
            rows, behind = curve.samples[-1][1] if curve.samples else (0, 1)
            return bool(rows >= expected and behind == 0)

        infra.wait_until(drained, 1800, what="every row copied and no chat behind")
    finally:
        curve.stop()
        connection.close()
    return [(t, rows, behind) for t, (rows, behind) in curve.samples], ready


def measure(running: infra.Stack, args: argparse.Namespace) -> dict[str, Any]:
    """The backlog produced, the ceilings measured over it, then the drain by the worker."""
    print(f"backlog: {args.messages:,} messages into {args.chats:,} chats", file=sys.stderr)
    produce(running, args)
    published = {
        key: REGISTRY.get_sample_value(f"dualwrite_{key}_total", {"task": SYNC_MESSAGES}) or 0
        for key in ("enqueued", "coalesced")
    }
    run: dict[str, Any] = {"sent": published["enqueued"], "coalesced": published["coalesced"]}
    run["queued"] = running.queue()
    total = "SELECT sum(jsonb_array_length(messages)) FROM copilot_chats"
    run["expected"] = int(infra.scalar(running.url, total))
    print("ceiling: sync_chats in this process", file=sys.stderr)
    per_batch = max(1, round(BATCH_ROWS * args.chats / args.messages))
    run["ceilings"] = [
        [f"ceiling: sync_chats, {n} chat(s) per transaction", *ceiling(running.url, n), ref]
        for n, ref in ((per_batch, "~1,000 rows each"), (1, "as one task would"))
    ]
    print("drain: starting the worker", file=sys.stderr)
    run["samples"], run["ready"] = drain(running, run["expected"], args.concurrency)
    log = running.processes[-1].log()
    run["task_seconds"] = [float(s) for s in re.findall(r"succeeded in ([0-9.]+)s", log)]
    run["outcomes"] = infra.task_outcomes(running.workers())
    run["drift"] = infra.state(running.url)[0]
    return run


def window_rates(samples: list[Any], width: float = 1.0) -> list[float]:
    """Rows/s over consecutive windows of `width` seconds, while rows were being written."""
    begin = next((i for i, (_, r, _) in enumerate(samples) if r > 0), 0)
    t0, r0, _ = samples[max(0, begin - 1)]
    out = []
    for t, r, _ in samples[begin:]:
        if t - t0 >= width:
            out.append((r - r0) / (t - t0))
            t0, r0 = t, r
    return out or [(samples[-1][1] - r0) / max(1e-9, samples[-1][0] - t0)]


def write_curve(samples: list[Any], ready: float, ceiling_rate: float, tag: str) -> None:
    rows = [(round(t, 3), r, b) for t, r, b in samples]
    infra.write_csv(f"drain_curve{tag}.csv", ["seconds_since_launch", "rows", "chats_behind"], rows)
    total = samples[-1][1]
    start = next((t for t, r, _ in samples if r > 0), ready)

    def draw(ax: Any) -> None:
        ax.plot([s[0] for s in samples], [s[1] for s in samples], label="rows copied (worker)")
        for rate, style, label in (
            (ceiling_rate, "--", f"batched-upsert ceiling ({ceiling_rate:,.0f} rows/s)"),
            (ceiling_rate * TARGET, ":", f"target: {TARGET:.0%} of the ceiling"),
        ):
            ax.plot([start, start + total / rate], [0, total], style, color="gray", label=label)
        ax.axvline(ready, color="tab:green", lw=0.8, label="worker ready")
        ax.set(xlabel="seconds since the worker was launched", ylabel="rows in the table")
        ax.set_title(f"Backlog drain: {total:,} message rows")

    infra.plot(infra.OUT / f"drain_curve{tag}.png", draw)


def report(args: argparse.Namespace, run: dict[str, Any]) -> None:
    samples, ready, expected = run["samples"], run["ready"], run["expected"]
    done = next(t for t, r, _ in samples if r >= expected)
    first = next(t for t, r, _ in samples if r > 0)
    rate, ceiling_rate = expected / (done - ready), run["ceilings"][0][2]
    rows = [
        [name, *infra.stats(seconds), per_s, ref]
        for name, seconds, per_s, ref in [
            *run["ceilings"],
            ["drain: seconds per task (worker log)", run["task_seconds"], "", ""],
            ["drain: rows/s per 1 s window", window_rates(samples), rate, ""],
        ]
    ]
    infra.show("seconds per transaction or task", ["measure", *infra.STATS, "rows/s", "ref."], rows)
    outcomes = run["outcomes"]
    infra.show(
        "the drain",
        ["drain", "value"],
        [
            ["message syncs pending (messages appended)", args.messages],
            ["chats", args.chats],
            ["tasks sent / publishes coalesced", f"{run['sent']:.0f} / {run['coalesced']:.0f}"],
            ["tasks in the queue when the worker started", run["queued"]],
            *[[f"tasks run by the worker: {k}", v] for k, v in sorted(outcomes.items())],
            ["rows to copy", expected],
            [
                "worker ready / first row / drift 0, after launch (s)",
                f"{ready:.2f} / {first:.2f} / {done:.2f}",
            ],
            ["drain rows/s (first row -> last row)", round(expected / max(1e-9, done - first))],
            ["drift after the drain (find_drift)", run["drift"]],
        ],
    )
    infra.show(
        "target, against the ceiling measured in this run",
        infra.FIGURE,
        [
            [
                "drain rows/s (worker ready -> drift 0)",
                round(rate),
                f"ceiling {ceiling_rate:,.0f} rows/s ({rate / ceiling_rate:.0%})",
                f">= {TARGET:.0%} of the ceiling",
                infra.at_least(rate / ceiling_rate, TARGET),
            ]
        ],
    )


def main() -> int:
    args = infra.options(
        __doc__,
        {"messages": 2_000, "chats": 50},
        messages=(100_000, "pending message syncs"),
        chats=(2_000, "chats they are appended to"),
        threads=(4, "producer threads"),
        concurrency=(2, "worker processes"),
        seed=dataset.SEED,
    )
    tag = "-quick" if args.quick else ""  # CI never overwrites a real measurement
    with infra.stack("cdw_bench_drain") as running:
        run = measure(running, args)
    write_curve(run["samples"], run["ready"], run["ceilings"][0][2], tag)
    report(args, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
