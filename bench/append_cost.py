"""What one append costs the copy, against the chat's length: appends through the API to chats of
10 to 10,000 messages, spaced so that each is its own sync, with the worker-side CPU of each
(the worker's main process, its pool children, their database backends; idle cost subtracted)
beside the user's own request time; then the total CPU per append (API + worker + database) in
`dual_write` against `jsonb_only`, the same processes. And, for reference, the worker-side CPU
of a bare Celery task (`bench.touch`: one upsert of one row) in the same worker. CPU is read
per thread from /proc (`schedstat`: nanoseconds, where `stat` counts 10 ms ticks), the backends
found by their `application_name`; the idle cost, measured first, is subtracted.

    .venv/bin/python -m bench.append_cost [--lengths 10,1000,5000,10000] [--appends 60]
        [--requests 300] [--worker-args "-c 2"] [--label NAME] [--save PATH] [--quick]
    .venv/bin/python -m bench.append_cost --plot docs/append_cost_before.json docs/...json

Targets: worker-side CPU per append on the longest chat <= 2x the 10-message chat, <= 5 ms on
the 10-message chat, total CPU `dual_write` / `jsonb_only` <= 1.6x. Writes the curve as JSON
(bench/out/append_cost.json, and `--save PATH`); `--plot` draws several such files into one
figure of the copy's cost per append against the chat's length (docs/append_cost.png).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench import dataset, infra

USER = "bench-append-cost"
TARGET_RATIO = 2.0  # longest chat / 10-message chat, worker-side CPU per append
TARGET_SMALL_MS = 5.0  # worker-side CPU per append, 10-message chat
TARGET_TOTAL = 1.6  # total CPU per append, dual_write / jsonb_only
SETTLE_S = 0.03  # after a sync is seen applied: its ack, its events, its metrics
# The worker-side groups of the stack's processes and backends.
WORKER_GROUPS = ("worker main", "pool children", "worker db")
PLOT = infra.ROOT / "docs" / "append_cost.png"
APPLIED = "SELECT applied_version >= wanted_version FROM copilot_chat_sync_state WHERE chat_id = %s"
BEHIND = "SELECT count(*) FROM copilot_chat_sync_state WHERE applied_version < wanted_version"


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process has used, in nanoseconds' resolution: the sum of its threads'
    `schedstat` run times (utime + stime in `/proc/PID/stat` count whole clock ticks, 10 ms,
    too coarse for a few ms per append); a thread that exited is not counted."""
    total = 0
    try:
        for thread in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((thread / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
    except (FileNotFoundError, ProcessLookupError):
        return None
    return total / 1e9


class Meter:
    """CPU seconds by group between `start()` and `stop()`: the worker's main process, its pool
    children, the API, and the database backends by `application_name` (worker, API, others).
    A process that starts in between counts from zero; one that exits in between is lost."""

    def __init__(self, running: infra.Stack, worker: infra.WorkerProcess) -> None:
        self.running, self.worker = running, worker
        self._start: dict[int, float] = {}
        self._connection = psycopg.connect(running.url, autocommit=True)

    def groups(self) -> dict[int, str]:
        found = {self.worker.pid: "worker main"}
        found.update({pid: "pool children" for pid in self.worker.child_pids()})
        for process in self.running.processes:
            if isinstance(process, infra.ApiProcess) and process.alive():
                found.update({pid: "api" for pid in [process.pid, *process.child_pids()]})
        for pid, name in self._connection.execute(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ):
            kind = name.removeprefix("chat-dualwrite-")
            found[pid] = {"worker": "worker db", "api": "api db"}.get(kind, "other db")
        return found

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for pid, group in self.groups().items():
            if (used := cpu_seconds(pid)) is not None:
                out[pid] = (group, used)
        return out

    def start(self) -> float:
        self._start = {pid: used for pid, (_, used) in self._snapshot().items()}
        return time.perf_counter()

    def stop(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for pid, (group, used) in self._snapshot().items():
            spent[group] = spent.get(group, 0.0) + used - self._start.get(pid, 0.0)
        return spent

    def close(self) -> None:
        self._connection.close()


def idle_rates(meter: Meter, seconds: float) -> dict[str, float]:
    """CPU seconds per second by group with no traffic at all: what each measurement subtracts."""
    started = meter.start()
    time.sleep(seconds)
    spent = meter.stop()
    elapsed = time.perf_counter() - started
    return {group: used / elapsed for group, used in spent.items()}


def net(spent: dict[str, float], idle: dict[str, float], elapsed: float) -> dict[str, float]:
    return {g: used - idle.get(g, 0.0) * elapsed for g, used in spent.items()}


@dataclass
class Point:
    """One chat length: per append, worker-side CPU by group and request time (ms)."""

    length: int
    appends: int
    cpu_ms: dict[str, float] = field(default_factory=dict)
    request_ms: list[float] = field(default_factory=list)

    @property
    def worker_ms(self) -> float:
        return sum(self.cpu_ms.get(g, 0.0) for g in WORKER_GROUPS)

    @property
    def request_p50(self) -> float:
        return statistics.median(self.request_ms) if self.request_ms else float("nan")


def import_chat(http: httpx.Client, length: int, seed: int) -> str:
    """A chat of `length` data-set elements (~0.9 KB each), imported through the API."""
    rng = random.Random(seed)
    transcript = dataset.transcript(rng, length, datetime(2026, 1, 1, tzinfo=UTC))
    body = {"user_id": USER, "title": f"{length} messages", "messages": transcript}
    return str(http.post("/admin/chats/import", json=body).raise_for_status().json()["id"])


def settle(running: infra.Stack) -> None:
    infra.wait_until(
        lambda: running.queue() == 0 and infra.scalar(running.url, BEHIND) == 0,
        300,
        what="every chat copied",
    )


def spaced_appends(
    running: infra.Stack,
    meter: Meter,
    http: httpx.Client,
    chat: str,
    count: int,
    idle: dict[str, float],
) -> tuple[dict[str, float], list[float]]:
    """`count` appends to `chat`, each sent once the previous one's sync has applied: CPU by
    group per append (ms, idle subtracted) and the requests' seconds."""
    rng = random.Random(chat)
    seconds = []
    with psycopg.connect(running.url, autocommit=True) as poll:

        def applied() -> bool:
            return bool(poll.execute(APPLIED, (chat,)).fetchone()[0])  # type: ignore[index]

        started = meter.start()
        for _ in range(count):
            body = {"message": dataset.element(rng, "user", datetime.now(UTC))}
            sent = time.perf_counter()
            http.post(f"/chats/{chat}/messages", json=body).raise_for_status()
            seconds.append(time.perf_counter() - sent)
            infra.wait_until(applied, 60, 0.002, what="the append's sync")
            time.sleep(SETTLE_S)
        time.sleep(0.2)
        spent = meter.stop()
    elapsed = time.perf_counter() - started
    return {g: v * 1e3 / count for g, v in net(spent, idle, elapsed).items()}, seconds


def curve(
    running: infra.Stack, meter: Meter, base: str, args: argparse.Namespace, idle: dict[str, float]
) -> list[Point]:
    headers = running.headers(USER, admin=True)
    points = []
    with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
        chats = {length: import_chat(http, length, length) for length in args.lengths}
        settle(running)
        for length, chat in chats.items():
            spaced_appends(running, meter, http, chat, 3, idle)  # warm-up: this chat's pages
            cpu, seconds = spaced_appends(running, meter, http, chat, args.appends, idle)
            point = Point(length, args.appends, cpu, [s * 1e3 for s in seconds])
            print(
                f"{length:>6} messages: worker-side {point.worker_ms:.2f} ms/append, "
                f"request p50 {point.request_p50:.2f} ms",
                file=sys.stderr,
            )
            points.append(point)
    return points


def total_cpu(
    running: infra.Stack, meter: Meter, base: str, args: argparse.Namespace, idle: dict[str, float]
) -> dict[str, dict[str, float]]:
    """CPU per append by group (ms, idle subtracted), one client appending round robin over
    fresh 10-message chats (each append its own sync), in `dual_write` and then `jsonb_only`
    (whose chats are deleted after: their syncs would otherwise wait for the next one)."""
    headers = running.headers()
    out = {}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        for phase in ("dual_write", "jsonb_only"):
            infra.scalar(running.url, "UPDATE dualwrite_phase SET phase = %s", (phase,))
            chats = infra.create_chats(base, headers, args.chats)
            for chat in chats:
                for i in range(10):
                    body = {"message": infra.message(f"seed-{i}")}
                    http.post(f"/chats/{chat}/messages", json=body).raise_for_status()
            if phase == "dual_write":
                settle(running)
            started = meter.start()
            for i in range(args.requests):
                body = {"message": infra.message(uuid.uuid4().hex)}
                http.post(f"/chats/{chats[i % len(chats)]}/messages", json=body).raise_for_status()
            if phase == "dual_write":
                settle(running)
            time.sleep(0.3)
            spent = meter.stop()
            elapsed = time.perf_counter() - started
            out[phase] = {g: v * 1e3 / args.requests for g, v in net(spent, idle, elapsed).items()}
            total = sum(out[phase].values())
            print(f"{phase}: {total:.2f} ms of CPU per append", file=sys.stderr)
        infra.scalar(running.url, "DELETE FROM copilot_chats WHERE id = ANY(%s::uuid[])", (chats,))
        infra.scalar(running.url, "UPDATE dualwrite_phase SET phase = 'dual_write'")
    return out


def bare_tasks(
    running: infra.Stack, meter: Meter, args: argparse.Namespace, idle: dict[str, float]
) -> dict[str, float]:
    """Worker-side CPU per `bench.touch` (a bare task: one upsert), spaced like the appends."""
    from app.settings import get_settings
    from bench.tasks import CREATE_TABLE, TOUCH
    from tasks.publish import producer

    infra.scalar(running.url, CREATE_TABLE)
    app = producer(get_settings())
    count = args.appends * 2
    with psycopg.connect(running.url, autocommit=True) as poll:

        def done(i: int) -> bool:
            found = poll.execute("SELECT count(*) FROM bench_touch").fetchone()
            return found is not None and found[0] > i

        started = meter.start()
        for i in range(count):
            now = datetime.now(UTC).isoformat()
            app.send_task(TOUCH, args=[i, now], queue="dualwrite.sync")
            infra.wait_until(lambda: done(i), 30, 0.002, what="the bare task")  # noqa: B023
            time.sleep(SETTLE_S)
        time.sleep(0.2)
        spent = meter.stop()
    elapsed = time.perf_counter() - started
    return {g: v * 1e3 / count for g, v in net(spent, idle, elapsed).items()}


def report(result: dict[str, Any]) -> None:
    points = [Point(**p) for p in result["curve"]]
    rows: list[list[Any]] = [
        [
            p.length,
            p.appends,
            *(p.cpu_ms.get(g, 0.0) for g in WORKER_GROUPS),
            p.worker_ms,
            p.request_p50,
        ]
        for p in points
    ]
    bare = result["bare_task_ms"]
    rows.append(["bench.touch", "", *(bare.get(g, 0.0) for g in WORKER_GROUPS), "", ""])
    rows[-1][5] = sum(bare.get(g, 0.0) for g in WORKER_GROUPS)
    infra.show(
        f"worker-side CPU per append (ms; idle subtracted; each append its own sync), beside "
        f"the user's request (p50 ms); worker {result['worker_args']!r}, env "
        f"{result.get('env') or '-'}; last row: a bare task",
        ["messages", "appends", *WORKER_GROUPS, "worker-side", "request p50"],
        rows,
    )
    totals = result["total_ms"]
    groups = sorted({g for t in totals.values() for g in t})
    infra.show(
        f"CPU per append by group (ms; idle subtracted), 1 client over {result['chats']} fresh "
        "10-message chats, the copies included",
        ["phase", *groups, "total"],
        [[ph, *(t.get(g, 0.0) for g in groups), sum(t.values())] for ph, t in totals.items()],
    )
    small, large = points[0], points[-1]
    ratio = large.worker_ms / small.worker_ms
    dual, base = (sum(totals[p].values()) for p in ("dual_write", "jsonb_only"))
    figures = [
        [
            f"worker-side CPU per append, {large.length:,} / {small.length} messages",
            f"{ratio:.2f}x",
            f"{large.worker_ms:.2f} / {small.worker_ms:.2f} ms",
            f"<= {TARGET_RATIO}x",
            infra.verdict(ratio, TARGET_RATIO),
        ],
        [
            f"worker-side CPU per append, {small.length} messages",
            f"{small.worker_ms:.2f} ms",
            f"the user's request {small.request_p50:.2f} ms; bare task {rows[-1][5]:.2f} ms",
            f"<= {TARGET_SMALL_MS} ms",
            infra.verdict(small.worker_ms, TARGET_SMALL_MS),
        ],
        [
            "total CPU per append, dual_write / jsonb_only",
            f"{dual / base:.2f}x",
            f"{dual:.2f} / {base:.2f} ms",
            f"<= {TARGET_TOTAL}x",
            infra.verdict(dual / base, TARGET_TOTAL),
        ],
    ]
    infra.show("targets, against references measured in this run", infra.FIGURE, figures)


def plot(files: list[Path]) -> None:
    """The copy's cost per append against the chat's length, one line per JSON file."""
    results = [json.loads(f.read_text()) for f in files]

    def draw(ax: Any) -> None:
        for result in results:
            points = [Point(**p) for p in result["curve"]]
            lengths = [p.length for p in points]
            label = result["label"]
            ax.plot(lengths, [p.worker_ms for p in points], "o-", label=f"{label}: worker-side")
            requests = [p.request_p50 for p in points]
            ax.plot(lengths, requests, "x--", alpha=0.6, label=f"{label}: the user's request p50")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("messages in the chat")
        ax.set_ylabel("ms per append (CPU for the worker side)")
        ax.set_title("the copy of one append against the chat's length")

    infra.plot(PLOT, draw)


def main() -> int:
    args = infra.options(
        __doc__,
        {"lengths": "10,200", "appends": 5, "requests": 40, "chats": 10, "idle": 2.0},
        lengths=("10,1000,5000,10000", "chat lengths, comma-separated, shortest first"),
        appends=(60, "spaced appends per chat length"),
        requests=(300, "appends per phase for the total CPU"),
        chats=(100, "fresh chats per phase for the total CPU"),
        idle=(5.0, "seconds of no traffic, to measure the idle cost"),
        worker_args=("-c 2", "the worker's options"),
        env=("", "settings for every process of the stack: KEY=VALUE,KEY=VALUE"),
        label=("", "names the curve in the JSON and the plot"),
        save=("", "also write the JSON here (docs/...)"),
        plot=("", "draw these JSON files (comma-separated) into docs/append_cost.png, and stop"),
    )
    if args.plot:
        plot([Path(f) for f in args.plot.split(",")])
        return 0
    args.lengths = [int(n) for n in args.lengths.split(",")]
    extra = {
        "MAX_CHAT_MESSAGES": str(max(args.lengths) * 2 + args.appends + 10),
        "USER_CONCURRENCY": "64",
    }
    extra.update(dict(kv.split("=", 1) for kv in args.env.split(",") if kv))
    with infra.stack("cdw_append_cost", **extra) as running:
        worker = running.worker("worker", "--include", "bench.tasks", *args.worker_args.split())
        base = running.api().base
        meter = Meter(running, worker)
        try:
            time.sleep(1.0)
            idle = idle_rates(meter, args.idle)
            points = curve(running, meter, base, args, idle)
            bare = bare_tasks(running, meter, args, idle)
            totals = total_cpu(running, meter, base, args, idle)
        finally:
            meter.close()
    result = {
        "label": args.label or "this run",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "worker_args": args.worker_args,
        "env": args.env,
        "chats": args.chats,
        "idle_cpu_per_s": idle,
        "curve": [asdict(p) for p in points],
        "bare_task_ms": bare,
        "total_ms": totals,
    }
    report(result)
    text = json.dumps(result, indent=1)
    (infra.OUT / "append_cost.json").write_text(text)
    if args.save:
        Path(args.save).write_text(text)
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
