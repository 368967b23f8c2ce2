"""Commit-to-row lag at a fixed rate: sustained appends through the API over a few hundred chats
with a worker running (prefork, 2 processes, as deployed), and in the same run, at the same rate,
a bare Celery round trip (`bench.touch`: one upsert of one row) for reference.

    .venv/bin/python bench/lag.py [--rate 200] [--seconds 30] [--chats 300] [--quick]

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
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import infra

TARGET_P99_MS = 50.0
TARGET_RATIO = 3.0
CONTENT_BYTES = 850  # ~0.9 KB per element with its other fields


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Schedule:
    """Planned send times at a fixed rate, taken by whichever sender thread is free.

    A send that starts late (every sender busy) goes out at once; its slip is recorded, so a
    client that could not keep the rate shows in the report instead of hiding in the lags.
    """

    def __init__(self, rate: float, seconds: float, senders: int) -> None:
        self.rate, self.total, self.senders = rate, int(rate * seconds), senders
        self.slips: list[float] = []
        self.lock = threading.Lock()
        self.started = 0.0
        self.finished = 0.0

    def run(self, send: Callable[[int, object], None], make_state: Callable[[], object]) -> None:
        counter = itertools.count()
        states = [make_state() for _ in range(self.senders)]  # clients ready before the clock

        def sender(state: object) -> None:
            slips = []
            try:
                while (i := next(counter)) < self.total:
                    planned = self.started + i / self.rate
                    delay = planned - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    slips.append(max(0.0, time.perf_counter() - planned))
                    send(i, state)
            finally:
                close = getattr(state, "close", None)
                if close is not None:
                    close()
                with self.lock:
                    self.slips.extend(slips)

        threads = [threading.Thread(target=sender, args=(state,)) for state in states]
        self.started = time.perf_counter() + 0.05
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.finished = time.perf_counter()

    @property
    def achieved_rate(self) -> float:
        return self.total / max(1e-9, self.finished - self.started)


class QueueWatch:
    """Samples the sync queue's length every 0.2 s."""

    def __init__(self, broker: infra.RedisServer) -> None:
        self.client = broker.client()
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append(infra.queue_length(self.client))

    def __enter__(self) -> QueueWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def bare_round_trips(
    database_url: str,
    broker: infra.RedisServer,
    rate: float,
    seconds: float,
    senders: int,
    meter: infra.CpuMeter,
) -> dict[str, object]:
    """`bench.touch` at the rate; lags done_at - sent_at, from the database."""
    from app.settings import get_settings
    from tasks.publish import producer

    app = producer(get_settings())
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("TRUNCATE bench_touch")

    def send(i: int, _state: object) -> None:
        app.send_task("bench.touch", args=[i, now_iso()], queue="dualwrite.sync")

    schedule = Schedule(rate, seconds, senders)
    meter.start()
    with QueueWatch(broker) as watch:
        schedule.run(send, lambda: None)
        at_end = infra.queue_length(watch.client)
        drained = time.perf_counter()
        done = infra.wait_until(
            lambda: (
                _count(database_url, "SELECT count(*) FROM bench_touch") >= schedule.total
                and time.perf_counter()
            ),
            120,
            "every bench.touch row",
        )
        cpu = meter.stop()
    with psycopg.connect(database_url) as connection:
        lags = [
            float(row[0])
            for row in connection.execute(
                "SELECT extract(epoch FROM done_at - sent_at) * 1000 FROM bench_touch ORDER BY id"
            )
        ]
    return {
        "lags": lags,
        "cpu": cpu,
        "schedule": schedule,
        "queue_max": max(watch.samples, default=0),
        "queue_at_end": at_end,
        "drain_s": done - drained,
    }


def api_appends(
    database_url: str,
    broker: infra.RedisServer,
    base: str,
    headers: dict[str, str],
    chats: list[str],
    rate: float,
    seconds: float,
    senders: int,
    meter: infra.CpuMeter,
) -> dict[str, object]:
    """Appends through the API at the rate; lags updated_at - created_at, from the database."""
    run = uuid.uuid4().hex[:8]
    requests: dict[str, float] = {}  # message id -> request seconds
    failures = [0]
    lock = threading.Lock()
    content = ("lorem ipsum dolor sit amet " * 40)[:CONTENT_BYTES]

    def send(i: int, http: object) -> None:
        assert isinstance(http, httpx.Client)
        message_id = f"lag-{run}-{i}"
        body = {
            "message": {
                "id": message_id,
                "role": "user",
                "content": content,
                "timestamp": now_iso(),
            }
        }
        started = time.perf_counter()
        try:
            ok = http.post(f"/chats/{chats[i % len(chats)]}/messages", json=body).status_code
        except httpx.HTTPError:
            ok = 0
        elapsed = time.perf_counter() - started
        with lock:
            if ok == 201:
                requests[message_id] = elapsed
            else:
                failures[0] += 1

    schedule = Schedule(rate, seconds, senders)
    meter.start()
    with QueueWatch(broker) as watch:
        schedule.run(send, lambda: _connected(base, headers))
        at_end = infra.queue_length(watch.client)
        drained = time.perf_counter()
        query = f"SELECT count(*) FROM copilot_chat_messages WHERE message_id LIKE 'lag-{run}-%'"
        done = infra.wait_until(
            lambda: _count(database_url, query) >= len(requests) and time.perf_counter(),
            120,
            "every appended message's row",
        )
        cpu = meter.stop()
    rows = []
    with psycopg.connect(database_url) as connection:
        for message_id, chat_id, lag_ms in connection.execute(
            "SELECT message_id, chat_id, extract(epoch FROM updated_at - created_at) * 1000 "
            "FROM copilot_chat_messages WHERE message_id LIKE %s ORDER BY created_at",
            (f"lag-{run}-%",),
        ):
            rows.append((message_id, str(chat_id), float(lag_ms), requests[message_id] * 1e3))
    return {
        "rows": rows,
        "cpu": cpu,
        "lags": [r[2] for r in rows],
        "request_ms": [r[3] for r in rows],
        "after_response_ms": [r[2] - r[3] for r in rows],
        "failures": failures[0],
        "schedule": schedule,
        "queue_max": max(watch.samples, default=0),
        "queue_at_end": at_end,
        "drain_s": done - drained,
    }


def _connected(base: str, headers: dict[str, str]) -> httpx.Client:
    """A keep-alive client whose connection is already open."""
    http = httpx.Client(base_url=base, headers=headers, timeout=30)
    http.get("/healthz").raise_for_status()
    return http


def _count(database_url: str, query: str) -> int:
    with psycopg.connect(database_url) as connection:
        row = connection.execute(query).fetchone()
        return int(row[0]) if row else 0


def create_chats(base: str, headers: dict[str, str], count: int) -> list[str]:
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        return [
            http.post("/chats", json={"title": f"lag {i}"}).raise_for_status().json()["id"]
            for i in range(count)
        ]


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

    infra.services_up()
    broker = infra.RedisServer().start()
    processes: list[infra.Process] = []
    try:
        with infra.database("cdw_lag") as database_url:
            env = infra.service_env(database_url, broker.url)
            os.environ.update(env)
            from app.auth import issue_token
            from bench.tasks import CREATE_TABLE

            with psycopg.connect(database_url, autocommit=True) as connection:
                connection.execute(CREATE_TABLE)
            processes.append(infra.worker(env, "worker", 2, "--include", "bench.tasks").start())
            port = infra.free_port()
            processes.append(infra.start_api(env, port))
            base = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {issue_token(env['AUTH_SECRET'], 'bench')}"}
            chats = create_chats(base, headers, args.chats)
            meter = infra.CpuMeter(
                infra.service_cpu_groups(database_url, broker, processes[1], processes[0])
            )
            window = (args.rate, args.seconds, args.senders, meter)

            print("warming up...", file=sys.stderr)
            warm = min(args.seconds, 3)
            bare_round_trips(database_url, broker, args.rate, warm, args.senders, meter)
            api_appends(
                database_url, broker, base, headers, chats, args.rate, warm, args.senders, meter
            )

            print(
                f"bare round trips, {args.rate:.0f}/s for {args.seconds:.0f}s...", file=sys.stderr
            )
            bare = bare_round_trips(database_url, broker, *window)
            print(f"appends, {args.rate:.0f}/s for {args.seconds:.0f}s...", file=sys.stderr)
            real = api_appends(database_url, broker, base, headers, chats, *window)
    finally:
        for process in reversed(processes):
            process.stop()
        broker.stop()

    report(bare, real, args)
    return 0


def report(bare: dict[str, object], real: dict[str, object], args: argparse.Namespace) -> None:
    def row(name: str, values: list[float], reference: str) -> list[object]:
        s = infra.stats(values)
        return [name, s["n"], s["min"], s["p50"], s["p99"], s["max"], s["mean"], reference]

    bare_lags: list[float] = bare["lags"]  # type: ignore[assignment]
    real_lags: list[float] = real["lags"]  # type: ignore[assignment]
    print(
        f"\ncommit-to-row lag (ms) at {args.rate:.0f}/s for {args.seconds:.0f}s each, "
        f"{args.chats} chats, worker prefork -c 2\n"
    )
    print(
        infra.table(
            ["measure", "n", "min", "p50", "p99", "max", "mean", "reference"],
            [
                row("bare round trip (bench.touch)", bare_lags, "send -> row"),
                row("append: send -> row", real_lags, "request + publish -> row"),
                row("append: request", real["request_ms"], "HTTP round trip"),  # type: ignore[arg-type]
                row("append: response -> row", real["after_response_ms"], "lag - request"),  # type: ignore[arg-type]
            ],
        )
    )

    def keeps_up(result: dict[str, object]) -> list[object]:
        schedule: Schedule = result["schedule"]  # type: ignore[assignment]
        slips = infra.stats(schedule.slips)
        return [
            schedule.total,
            schedule.achieved_rate,
            slips["p99"] * 1e3,
            result["queue_max"],
            result["queue_at_end"],
            result["drain_s"],
        ]

    print("\nthe rate and the queue\n")
    print(
        infra.table(
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
                ["bare round trip", *keeps_up(bare)],
                ["append", *keeps_up(real)],
            ],
        )
    )
    cpu: list[tuple[str, dict[str, float], int]] = [
        ("bare round trip", bare["cpu"], len(bare_lags)),  # type: ignore[list-item]
        ("append", real["cpu"], len(real_lags)),  # type: ignore[list-item]
    ]
    groups = sorted({g for _, spent, _ in cpu for g in spent})
    print("\nCPU per message (ms), sending until the last row landed\n")
    print(
        infra.table(
            ["measure", *groups, "total"],
            [
                [
                    name,
                    *(spent.get(g, 0.0) * 1e3 / max(1, n) for g in groups),
                    sum(spent.values()) * 1e3 / max(1, n),
                ]
                for name, spent, n in cpu
            ],
        )
    )
    if real["failures"]:
        print(f"  {real['failures']} append requests failed")

    real_p99 = infra.percentile(real_lags, 99)
    bare_p99 = infra.percentile(bare_lags, 99)
    ratio = real_p99 / bare_p99
    queue_ok = _kept_up(real)
    # A reference whose own queue grew measured the backlog, not a round trip: no valid ratio.
    ratio_result = (
        infra.verdict(ratio, TARGET_RATIO)
        if _kept_up(bare)
        else "n/a: the bare reference fell behind"
    )
    print("\ntargets, against the bare round trip measured in this run\n")
    print(
        infra.table(
            ["target", "measured", "limit", "result"],
            [
                ["append lag p99 (ms)", real_p99, TARGET_P99_MS, infra.verdict(real_p99, 50)],
                [
                    "append p99 / bare p99",
                    ratio,
                    TARGET_RATIO,
                    ratio_result,
                ],
                [
                    "queue does not grow",
                    f"{real['queue_at_end']} at end, drained in {float(real['drain_s']):.2f}s",  # type: ignore[arg-type]
                    "<= 20, < 2 s",
                    "met" if queue_ok else "MISSED",
                ],
            ],
        )
    )
    write_outputs(bare, real, args)


def _kept_up(result: dict[str, object]) -> bool:
    """The queue was short when sending stopped and every row landed soon after."""
    return int(result["queue_at_end"]) <= 20 and float(result["drain_s"]) < 2  # type: ignore[call-overload]


def write_outputs(
    bare: dict[str, object], real: dict[str, object], args: argparse.Namespace
) -> None:
    infra.OUT.mkdir(parents=True, exist_ok=True)
    with (infra.OUT / "lag_appends.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["message_id", "chat_id", "lag_ms", "request_ms"])
        out.writerows(real["rows"])  # type: ignore[arg-type]
    with (infra.OUT / "lag_bare.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "lag_ms"])
        out.writerows(enumerate(bare["lags"]))  # type: ignore[arg-type]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_lags: list[float] = real["lags"]  # type: ignore[assignment]
    bare_lags: list[float] = bare["lags"]  # type: ignore[assignment]
    if not real_lags or not bare_lags:
        return
    # Log-spaced bins: the body (a few ms) and the tail (tens to hundreds) both stay visible.
    low = max(0.1, min(min(real_lags), min(bare_lags)))
    high = max(max(real_lags), max(bare_lags), low * 2)
    bins = [low * (high / low) ** (i / 80) for i in range(81)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(
        [max(v, low) for v in bare_lags],
        bins=bins,
        alpha=0.6,
        label="bare round trip (bench.touch)",
    )
    ax.hist(
        [max(v, low) for v in real_lags],
        bins=bins,
        alpha=0.6,
        label="append through the API: send -> row",
    )
    ax.set_xscale("log")
    for values, style in ((bare_lags, ":"), (real_lags, "--")):
        ax.axvline(infra.percentile(values, 99), color="black", linestyle=style, linewidth=1)
    ax.axvline(TARGET_P99_MS, color="red", linewidth=1, label=f"target p99 {TARGET_P99_MS:.0f} ms")
    ax.set_xlabel("lag (ms); dotted/dashed lines: p99 of bare/append")
    ax.set_ylabel("messages")
    ax.set_title(f"commit-to-row lag at {args.rate:.0f}/s over {args.chats} chats")
    ax.legend()
    fig.tight_layout()
    fig.savefig(infra.OUT / "lag_histogram.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {infra.OUT / 'lag_histogram.png'}, lag_appends.csv, lag_bare.csv")


if __name__ == "__main__":
    sys.exit(main())
