"""Commit-to-row lag at a fixed rate: sustained appends through the API over a few hundred chats
with a worker running (prefork, 2 processes, as deployed), and in the same run, at the same rate,
a bare Celery round trip (`bench.touch`: one upsert of one row) for reference.

    .venv/bin/python -m bench.lag [--rate 200] [--seconds 30] [--chats 300] [--quick]

Send times are planned (`--rate` per second, spread over `--senders` threads), not "as fast as
possible". Lags come from the database: a message's `timestamp` is its client send time and
becomes the row's `created_at`; the row's `updated_at` is `now()` of the sync transaction that
wrote it, so lag = updated_at - created_at. For `bench.touch`, lag = done_at - sent_at, with
`done_at` from the same clock. Writes bench/out/lag_histogram.png and the raw lags as CSV.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from bench import infra

TARGET_P99_MS = 50.0
TARGET_RATIO = 3.0


@dataclass
class Run:
    """One paced measurement: what was sent, how the queue and the CPU fared, and the lags."""

    total: int = 0
    achieved: float = 0.0
    slips: list[float] = field(default_factory=list)
    queue_max: int = 0
    queue_at_end: int = 0
    drain_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    request_ms: list[float] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    # The workers' own lag histogram over the run: syncs per bucket (upper bound, seconds).
    synced: dict[float, int] = field(default_factory=dict)

    def kept_up(self) -> bool:
        """The queue was short when sending stopped and every row landed soon after."""
        return self.queue_at_end <= 20 and self.drain_s < 2


def paced(
    running: infra.Stack,
    args: argparse.Namespace,
    seconds: float,
    send: Callable[[int, Any], None],
    client: Callable[[], Any],
    landed: Callable[[int], bool],
) -> Run:
    """`send(i, client)` at `args.rate` per second from `args.senders` threads, each with its own
    client made before the clock starts. A send that starts late (every sender busy) goes out at
    once and its slip is recorded. Then waits until `landed(total)`."""
    run, counter, lock = Run(total=int(args.rate * seconds)), itertools.count(), threading.Lock()
    clients = [client() for _ in range(args.senders)]
    meter = infra.CpuMeter(running)
    meter.start()
    queue = infra.Poller(running.queue, 0.2).start()
    started = time.perf_counter() + 0.05

    def sender(state: Any) -> None:
        slips = []
        while (i := next(counter)) < run.total:
            planned = started + i / args.rate
            time.sleep(max(0.0, planned - time.perf_counter()))
            slips.append(max(0.0, time.perf_counter() - planned))
            send(i, state)
        with lock:
            run.slips += slips

    threads = [threading.Thread(target=sender, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stopped = time.perf_counter()
    run.achieved, run.queue_at_end = run.total / (stopped - started), running.queue()
    infra.wait_until(lambda: landed(run.total), 120, what="every row")
    run.drain_s, run.cpu = time.perf_counter() - stopped, meter.stop()
    queue.stop()
    run.queue_max = max(queue.values(), default=0)
    for c in clients:
        if c is not None:
            c.close()
    return run


def bare_round_trips(running: infra.Stack, args: argparse.Namespace, seconds: float) -> Run:
    """`bench.touch` at the rate; lags done_at - sent_at, from the database."""
    from app.settings import get_settings
    from bench.tasks import TOUCH
    from tasks.publish import producer

    app = producer(get_settings())
    infra.scalar(running.url, "TRUNCATE bench_touch")

    def send(i: int, _: Any) -> None:
        sent_at = datetime.now(UTC).isoformat(timespec="microseconds")
        app.send_task(TOUCH, args=[i, sent_at], queue="dualwrite.sync")

    def landed(total: int) -> bool:
        return int(infra.scalar(running.url, "SELECT count(*) FROM bench_touch")) >= total

    run = paced(running, args, seconds, send, lambda: None, landed)
    lag = "SELECT extract(epoch FROM done_at - sent_at) * 1000 FROM bench_touch ORDER BY id"
    with psycopg.connect(running.url) as connection:
        run.lags = [float(r[0]) for r in connection.execute(lag)]
    return run


def api_appends(running: infra.Stack, args: argparse.Namespace, seconds: float) -> Run:
    """Appends through the API at the rate; lags updated_at - created_at, from the database."""
    api, prefix = running.processes[-1], f"lag-{uuid.uuid4().hex[:8]}-"
    assert isinstance(api, infra.ApiProcess)
    requests: dict[str, float] = {}  # message id -> request seconds

    def client() -> httpx.Client:
        http = httpx.Client(base_url=api.base, headers=running.headers(), timeout=30)
        http.get("/healthz").raise_for_status()  # the connection open before the clock
        return http

    def send(i: int, http: httpx.Client) -> None:
        body = {"message": infra.message(f"{prefix}{i}")}
        started = time.perf_counter()
        try:
            chat = args.chat_ids[i % len(args.chat_ids)]
            if http.post(f"/chats/{chat}/messages", json=body).status_code == 201:
                requests[str(body["message"]["id"])] = time.perf_counter() - started
        except httpx.HTTPError:
            pass

    count = f"SELECT count(*) FROM copilot_chat_messages WHERE message_id LIKE '{prefix}%'"
    before = worker_lags(running)
    run = paced(
        running,
        args,
        seconds,
        send,
        client,
        lambda _: infra.scalar(running.url, count) >= len(requests),
    )
    with psycopg.connect(running.url) as connection:
        run.rows = [
            (m, str(c), float(lag), requests[m] * 1e3)
            for m, c, lag in connection.execute(
                "SELECT message_id, chat_id, extract(epoch FROM updated_at - created_at) * 1000 "
                "FROM copilot_chat_messages WHERE message_id LIKE %s ORDER BY created_at",
                (f"{prefix}%",),
            )
        ]
    run.lags, run.request_ms = [r[2] for r in run.rows], [r[3] for r in run.rows]
    after = worker_lags(running)
    run.synced = {b: after.get(b, 0) - before.get(b, 0) for b in after}
    return run


def worker_lags(running: infra.Stack) -> dict[float, int]:
    """The workers' `dualwrite_sync_lag_seconds` buckets: from the write's transaction (the
    chat's `updated_at`) to the end of the convergence that copied it, per sync."""
    cumulative: dict[float, int] = {}
    for worker in running.workers():
        for sample in worker.samples("dualwrite_sync_lag_seconds_bucket"):
            bound = float(sample.labels["le"])
            cumulative[bound] = cumulative.get(bound, 0) + int(sample.value)
    per_bucket, below = {}, 0
    for bound in sorted(cumulative):
        per_bucket[bound], below = cumulative[bound] - below, cumulative[bound]
    return per_bucket


def lag_bound(synced: dict[float, int], share: float) -> float:
    """The smallest bucket bound (seconds) within which `share` of the syncs landed."""
    total, seen = sum(synced.values()), 0
    for bound in sorted(synced):
        seen += synced[bound]
        if total and seen >= share * total:
            return bound
    return float("inf")


def synced_share(synced: dict[float, int]) -> str:
    total = max(1, sum(synced.values()))
    shares = []
    for limit in (0.01, 0.025, 0.05):
        within = sum(n for bound, n in synced.items() if bound <= limit)
        shares.append(f"{100 * within / total:.1f}% <= {limit * 1e3:.0f} ms")
    return ", ".join(shares)


def report(bare: Run, real: Run, args: argparse.Namespace) -> None:
    after = [lag - req for lag, req in zip(real.lags, real.request_ms, strict=True)]
    infra.show(
        f"commit-to-row lag (ms) at {args.rate:.0f}/s for {args.seconds:.0f}s each, "
        f"{args.chats} chats, worker prefork -c 2",
        ["measure", *infra.STATS, "reference"],
        [
            ["bare round trip (bench.touch)", *infra.stats(bare.lags), "send -> row"],
            ["append: send -> row", *infra.stats(real.lags), "request + publish -> row"],
            ["append: request", *infra.stats(real.request_ms), "HTTP round trip"],
            ["append: response -> row", *infra.stats(after), "lag - request"],
        ],
    )
    runs = {"bare round trip": bare, "append": real}
    infra.show(
        "the rate and the queue",
        [
            "measure",
            "sent",
            "achieved/s",
            "send slip p99 ms",
            "queue max",
            "queue at end",
            "drain s",
        ],
        [
            [
                name,
                r.total,
                r.achieved,
                infra.percentile(r.slips, 99) * 1e3,
                r.queue_max,
                r.queue_at_end,
                r.drain_s,
            ]
            for name, r in runs.items()
        ],
    )
    groups = sorted({g for r in runs.values() for g in r.cpu})
    infra.show(
        "CPU per message (ms), sending until the last row landed",
        ["measure", *groups, "total"],
        [
            [
                name,
                *(r.cpu.get(g, 0.0) * 1e3 / max(1, r.total) for g in groups),
                sum(r.cpu.values()) * 1e3 / max(1, r.total),
            ]
            for name, r in runs.items()
        ],
    )
    if failed := real.total - len(real.lags):
        print(f"  {failed} append requests failed")
    real_p99, bare_p99 = infra.percentile(real.lags, 99), infra.percentile(bare.lags, 99)
    ratio = real_p99 / bare_p99
    # A reference whose own queue grew measured the backlog, not a round trip: no valid ratio.
    ratio_verdict = (
        infra.verdict(ratio, TARGET_RATIO)
        if bare.kept_up()
        else "n/a: the bare reference fell behind"
    )
    infra.show(
        "targets, against the bare round trip measured in this run",
        infra.FIGURE,
        [
            [
                "append lag p99 (ms)",
                real_p99,
                f"bare p99 {bare_p99:.1f} ms",
                f"<= {TARGET_P99_MS:.0f}",
                infra.verdict(real_p99, TARGET_P99_MS),
            ],
            ["append p99 / bare p99", ratio, "", f"<= {TARGET_RATIO:.0f}x", ratio_verdict],
            [
                "commit-to-row lag, the workers' histogram",
                synced_share(real.synced),
                "syncs within each bound",
                "p99 <= 20 (nearest bound 25)",
                infra.verdict(lag_bound(real.synced, 0.99) * 1e3, 25),
            ],
            [
                "queue does not grow",
                f"{real.queue_at_end} at end, drained in {real.drain_s:.2f}s",
                "",
                "<= 20, < 2 s",
                "met" if real.kept_up() else "MISSED",
            ],
        ],
    )


def write_outputs(bare: Run, real: Run, args: argparse.Namespace) -> None:
    for name, header, rows in (
        ("lag_appends.csv", ["message_id", "chat_id", "lag_ms", "request_ms"], real.rows),
        ("lag_bare.csv", ["id", "lag_ms"], list(enumerate(bare.lags))),
    ):
        with (infra.OUT / name).open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    if not real.lags or not bare.lags:
        return
    # Log-spaced bins: the body (a few ms) and the tail (tens to hundreds) both stay visible.
    low = max(0.1, min(*real.lags, *bare.lags))
    high = max(*real.lags, *bare.lags, low * 2)
    bins = [low * (high / low) ** (i / 80) for i in range(81)]

    def draw(ax: Any) -> None:
        for lags, style, label in (
            (bare.lags, ":", "bare round trip (bench.touch)"),
            (real.lags, "--", "append through the API: send -> row"),
        ):
            ax.hist([max(v, low) for v in lags], bins=bins, alpha=0.6, label=label)
            ax.axvline(infra.percentile(lags, 99), color="black", linestyle=style, linewidth=1)
        ax.axvline(
            TARGET_P99_MS, color="red", linewidth=1, label=f"target p99 {TARGET_P99_MS:.0f} ms"
        )
        ax.set_xscale("log")
        ax.set(xlabel="lag (ms); dotted/dashed lines: p99 of bare/append", ylabel="messages")
        ax.set_title(f"commit-to-row lag at {args.rate:.0f}/s over {args.chats} chats")

    infra.plot(infra.OUT / "lag_histogram.png", draw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="sends per second")
    parser.add_argument("--seconds", type=float, default=30, help="per measurement")
    parser.add_argument("--chats", type=int, default=300)
    parser.add_argument("--senders", type=int, default=16, help="client threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps this working")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.chats, args.rate = 4, 30, 50
    # One user stands for every sender here: the per-user cap would turn most of them away.
    with infra.stack("cdw_lag", USER_CONCURRENCY="64", USER_QUEUE="64") as running:
        from bench.tasks import CREATE_TABLE  # imports the settings: only once they are set

        infra.scalar(running.url, CREATE_TABLE)
        running.worker("worker", "-c", "2", "--include", "bench.tasks")
        args.chat_ids = infra.create_chats(running.api().base, running.headers(), args.chats)
        print("warming up...", file=sys.stderr)
        bare_round_trips(running, args, min(args.seconds, 3))
        api_appends(running, args, min(args.seconds, 3))
        print(f"{args.rate:.0f}/s for {args.seconds:.0f}s: bare, then appends", file=sys.stderr)
        bare = bare_round_trips(running, args, args.seconds)
        real = api_appends(running, args, args.seconds)
    report(bare, real, args)
    write_outputs(bare, real, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
