"""What the benches share: a database and a broker of their own with the service's processes
(launched by `harness.processes`), traffic through the API, samples, stats and report tables."""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from sqlalchemy import event

from app.auth import issue_token
from app.broker import queue_lengths
from app.db import make_engine, make_sessionmaker, transaction
from app.jobs import JobQueue, publish_after_commit
from app.repositories import dead_letters, sync_state
from app.services import chats as service
from app.services.drift import find_drift
from app.settings import Settings, get_settings
from harness.processes import ROOT as ROOT
from harness.processes import ApiProcess as ApiProcess
from harness.processes import BeatProcess, Process, RedisServer
from harness.processes import WorkerProcess as WorkerProcess
from harness.processes import wait_until as wait_until

P = TypeVar("P", bound=Process)

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
OUT = ROOT / "bench" / "out"
CONTENT_BYTES = 850  # with id, role and timestamp: ~0.9 KB per element


def options(doc: str, quick: dict[str, Any], **defaults: Any) -> argparse.Namespace:
    """`--NAME` for each default (or `(default, help)`), and `--quick`: the `quick` values, tiny
    sizes that keep the bench working (its figures then mean nothing)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        value, what = default if isinstance(default, tuple) else (default, None)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=what)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=what)
    tiny = ", ".join(f"{name} {value}" for name, value in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({tiny})")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
    return args


@contextmanager
def database(prefix: str, revision: str = "head", template: str | None = None) -> Iterator[str]:
    """A database of the bench's own (`alembic upgrade REVISION`, or a copy of `template`), in
    DATABASE_URL, dropped afterwards; SIGTERM becomes an exit, so that `finally` blocks run."""
    check = subprocess.run([str(ROOT / "scripts" / "services.sh")], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(check.stdout.strip())
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    copy = f' TEMPLATE "{template.rsplit("/", 1)[1]}"' if template else ""
    scalar(ADMIN_DSN, f'CREATE DATABASE "{name}"{copy}')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    os.environ["DATABASE_URL"] = url
    try:
        if template is None:
            argv = [sys.executable, "-m", "alembic", "upgrade", revision]
            subprocess.run(argv, cwd=ROOT, env=dict(os.environ), check=True, capture_output=True)
        yield url
    finally:
        scalar(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def scalar(url: str, sql: str, params: Any = None) -> Any:
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(sql, params)
        row = cursor.fetchone() if cursor.description else None
    return row[0] if row else None


@contextmanager
def sessions(
    url: str, *, worker: bool = False, pool_size: int = 1, fsync: bool = True
) -> Iterator[Any]:
    """A sessionmaker on the service's engine; without `fsync`, for the bench's own setup."""
    engine = make_engine(Settings(database_url=url), worker=worker, pool_size=pool_size)
    if not fsync:

        @event.listens_for(engine, "connect")
        def no_fsync(dbapi_connection: Any, record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")
            dbapi_connection.commit()

    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@dataclass
class Stack:
    """A database, a redis-server, and the service's processes, which stop with the stack."""

    url: str
    broker: RedisServer
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def _start(self, process: P) -> P:
        self.processes.append(process)
        return process.start()

    def workers(self) -> list[WorkerProcess]:
        return [p for p in self.processes if isinstance(p, WorkerProcess)]

    def worker(self, name: str = "worker", *args: str) -> WorkerProcess:
        log = OUT / f"{name}-{os.getpid()}.log"
        return self._start(WorkerProcess(self.env, log, f"{name}-{os.getpid()}", *args))

    def api(self, name: str = "api") -> ApiProcess:
        return self._start(ApiProcess(self.env, OUT / f"{name}-{os.getpid()}.log"))

    def beat(self) -> BeatProcess:
        return self._start(BeatProcess(self.env, OUT / f"beat-{os.getpid()}.log"))

    def headers(self, user: str = "bench", admin: bool = False) -> dict[str, str]:
        token = issue_token(self.env["AUTH_SECRET"], user, admin=admin)
        return {"Authorization": f"Bearer {token}"}

    def queue(self) -> int:
        return queue_length(self.broker.url)


@contextmanager
def stack(prefix: str, **extra: str) -> Iterator[Stack]:
    """A database and a redis-server of the bench's own; the environment, with `extra`
    settings, points at them."""
    with database(prefix) as url:
        broker = RedisServer().start()
        secret = os.environ.get("AUTH_SECRET") or secrets.token_hex(32)
        env = {**os.environ, "REDIS_URL": broker.url, "AUTH_SECRET": secret, **extra}
        os.environ.update(env)
        running = Stack(url, broker, env)
        try:
            yield running
        finally:
            for process in reversed(running.processes):
                process.stop()
            broker.stop()


def unit_of_work(
    factory: Any, publish: Callable[..., Any], user: str, operation: Callable[..., Any], *args: Any
) -> Any:
    """`operation(ctx, *args)`, one of `app.services.chats`, run in this process as the API runs
    it: in a transaction of its own, its jobs published with `publish` after the commit."""
    jobs = JobQueue()
    with transaction(factory) as session:
        result = operation(service.Context(session, jobs, get_settings(), user), *args)
    publish_after_commit(jobs, publish)
    return result


def message(message_id: str, role: str = "user", size: int = CONTENT_BYTES) -> dict[str, str]:
    """One ~0.9 KB element, timestamped now."""
    content = ("lorem ipsum dolor sit amet " * 40)[:size]
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    return {"id": message_id, "role": role, "content": content, "timestamp": now}


def create_chats(base: str, headers: dict[str, str], count: int) -> list[str]:
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        return [
            http.post("/chats", json={"title": f"bench {i}"}).raise_for_status().json()["id"]
            for i in range(count)
        ]


def in_threads(target: Callable[..., Any], args: Iterable[tuple[Any, ...]]) -> None:
    """`target(*a)` for each `a` of `args`, each in a thread of its own, until all return."""
    threads = [threading.Thread(target=target, args=a, daemon=True) for a in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def append_load(
    base: str, headers: dict[str, str], chats: list[str], count: int, clients: int
) -> list[float]:
    """Seconds per successful append: `count` over `chats` by `clients` closed-loop clients."""
    counter, latencies = itertools.count(), []

    def client() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            while (i := next(counter)) < count:
                body = {"message": message(f"u-{uuid.uuid4().hex}")}
                started = time.perf_counter()
                try:
                    path = f"/chats/{chats[i % len(chats)]}/messages"
                    created = http.post(path, json=body).status_code == 201
                except httpx.HTTPError:
                    created = False
                if created:
                    latencies.append(time.perf_counter() - started)

    in_threads(client, [()] * clients)
    return latencies


class Poller:
    """(seconds since start, `sample()`) every `every` seconds, from `start()` to `stop()`."""

    def __init__(self, sample: Callable[[], Any], every: float) -> None:
        self.sample, self.every = sample, every
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.perf_counter()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.started, self.sample()))
            self._stop.wait(self.every)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def values(self) -> list[Any]:
        return [value for _, value in self.samples]


def queue_length(redis_url: str, queue: str = "dualwrite.sync") -> int:
    """Messages waiting in a queue (not those a worker has reserved), by the service's count."""
    return queue_lengths(Settings(redis_url=redis_url)).waiting[queue]


def task_outcomes(workers: Iterable[WorkerProcess]) -> dict[str, int]:
    """Task executions the worker nodes counted (each serves its own), by "task|outcome"."""
    counted: dict[str, int] = {}
    for worker in workers:
        for sample in worker.samples("dualwrite_tasks_total"):
            key = f"{sample.labels['task']}|{sample.labels['outcome']}"
            counted[key] = counted.get(key, 0) + int(sample.value)
    return counted


def state(url: str) -> tuple[int, int, int]:
    """(rows of drift, chats behind, open dead letters), by the service's own checkers."""
    with sessions(url) as factory, transaction(factory) as session:
        found = find_drift(session)
        drift = found.rows + found.behind_rows  # every row that differs, lag included
        letters = sum(dead_letters.count_open(session).values())
        return drift, sync_state.count_behind(session), letters


def proc_status(pid: int, field: str = "VmRSS") -> int | None:
    """A KiB line of /proc/PID/status (VmRSS, RssAnon), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (all its threads), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used between `start()` and `stop()` by a stack's processes, by group (a
    process that appears in between counts from zero; one that exits in between is lost)."""

    def __init__(self, running: Stack) -> None:
        self.running = running
        self._start: dict[int, float] = {}

    def groups(self) -> dict[str, list[int]]:
        found = {"bench client": [os.getpid()], "redis": [self.running.broker.pid]}
        for process in self.running.processes:
            kind = {ApiProcess: "api", WorkerProcess: "worker"}.get(type(process))
            if kind and process.alive():
                found.setdefault(kind, []).extend([process.pid, *process.child_pids()])
        with psycopg.connect(self.running.url, autocommit=True) as connection:
            for pid, name in connection.execute(
                "SELECT pid, application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ):
                group = f"db ({name.removeprefix('chat-dualwrite-') or 'bench'})"
                found.setdefault(group, []).append(pid)
        return found

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for group, pids in self.groups().items():
            for pid in pids:
                if (used := cpu_seconds(pid)) is not None:
                    out[pid] = (group, used)
        return out

    def start(self) -> None:
        self._start = {pid: used for pid, (_, used) in self._snapshot().items()}

    def stop(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for pid, (group, used) in self._snapshot().items():
            spent[group] = spent.get(group, 0.0) + used - self._start.get(pid, 0.0)
        return spent


def percentile(values: list[Any], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))])


STATS = ["n", "min", "p50", "p99", "max", "mean"]


def stats(values: list[float], scale: float = 1.0) -> list[Any]:
    """The STATS of a sample, multiplied by `scale`."""
    if not values:
        return [0, *[float("nan")] * 5]
    shown = [min(values), percentile(values, 50), percentile(values, 99), max(values)]
    return [len(values), *(v * scale for v in shown), statistics.fmean(values) * scale]


def verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"MISSED by {value / limit:.2f}x"


def at_least(value: float, floor: float) -> str:
    return "met" if value >= floor else f"MISSED by {floor / value:.2f}x"


FIGURE = ["figure", "measured", "reference (same run)", "target", "verdict"]


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [headers, *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}\n\n{table(headers, rows)}")


def write_csv(name: str, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    with (OUT / name).open("w", newline="") as out:
        csv.writer(out).writerows([header, *rows])


def plot(path: Path, draw: Callable[[Any], None]) -> None:
    """A figure drawn by `draw(axes)`, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    draw(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)}")
