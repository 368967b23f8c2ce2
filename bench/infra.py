"""What the bench scripts share: a database and a Redis server of their own, and the service's
processes (API, worker, beat) started against them as subprocesses."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
OUT = ROOT / "bench" / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that `finally` blocks stop what a bench started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def services_up() -> None:
    check = subprocess.run([str(ROOT / "scripts" / "services.sh")], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(check.stdout.strip())


@contextmanager
def database(prefix: str, revision: str = "head") -> Iterator[str]:
    """A new database built by `alembic upgrade REVISION`; dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", revision],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        yield url
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Process:
    """A subprocess in its own session, so that it and its children stop together."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], ready: str | None) -> None:
        self.name, self.argv, self.env, self.ready = name, argv, env, ready
        OUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUT / f"{name}-{os.getpid()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Process:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.ready:
            marker = self.ready
            wait_until(
                lambda: (
                    self._alive()
                    and marker in self.log_path.read_bytes()[offset:].decode(errors="replace")
                ),
                timeout,
                f"{self.name} to start (see {self.log_path})",
            )
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited; see {self.log_path}")
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the whole group: a crashed container."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisServer(Process):
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
            ],
            dict(os.environ),
            "Ready to accept connections",
        )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


def service_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "AUTH_SECRET": os.environ.get("AUTH_SECRET") or secrets.token_hex(32),
        **extra,
    }


def worker(env: dict[str, str], name: str = "worker", concurrency: int = 2, *args: str) -> Process:
    return Process(
        name,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "--loglevel=INFO",
            "-n",
            f"{name}-{os.getpid()}@%h",
            "-c",
            str(concurrency),
            "-Q",
            "dualwrite.sync,dualwrite.maintenance",
            "--without-gossip",
            "--without-mingle",
            *args,
        ],
        env,
        " ready.",
    )


def beat(env: dict[str, str]) -> Process:
    return Process(
        "beat",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "beat",
            "--loglevel=INFO",
            "-s",
            str(OUT / f"beat-schedule-{os.getpid()}"),
        ],
        env,
        "beat: Starting",
    )


def api(env: dict[str, str], port: int) -> Process:
    return Process(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env,
        None,
    )


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


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


# Helpers for the measurement benches (overhead, lag, memory).


def answers(base: str) -> bool:
    """Whether the API at `base` answers its health check."""
    import httpx

    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_api(env: dict[str, str], port: int, name: str = "api") -> Process:
    """The API started and answering `/healthz`."""
    process = Process(name, api(env, port).argv, env, None).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process._alive() and answers(base), 60, f"{name} to answer")
    except BaseException:
        process.stop()
        raise
    return process


def rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    """Resident set size of a process in KiB, or None when it is gone. `field` is a line of
    /proc/PID/status: VmRSS (all resident pages), RssAnon (heap and stacks: what a leak grows),
    RssFile (mapped files, which the kernel may drop and read back)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# Kombu's Redis transport keeps one list per queue and priority step (0 has the bare name).
_PRIORITY_SEP = "\x06\x16"


def queue_length(client: redis.Redis, queue: str = "dualwrite.sync") -> int:
    """Messages waiting in a queue (not counting those a worker has reserved)."""
    pipe = client.pipeline(transaction=False)
    for key in [queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in (3, 6, 9))]:
        pipe.llen(key)
    return int(sum(pipe.execute()))


def worker_tasks_done(client: redis.Redis) -> int:
    """Task executions the workers counted (every outcome: applied, skipped, retry, ...)."""
    from app.metrics import WORKER_KEY

    raw = client.hgetall(WORKER_KEY)
    return int(sum(float(v) for k, v in raw.items() if k.decode().startswith("tasks|")))


def stats(values: list[float]) -> dict[str, float]:
    """n, min, p50, p99, max, mean of a sample."""
    if not values:
        nan = float("nan")
        return {"n": 0, "min": nan, "p50": nan, "p99": nan, "max": nan, "mean": nan}
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"MISSED by {value / limit:.2f}x"


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (all its threads), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def database_backends(database_url: str) -> dict[str, list[int]]:
    """PostgreSQL backend pids connected to this database, by application name."""
    groups: dict[str, list[int]] = {}
    with psycopg.connect(database_url, autocommit=True) as connection:
        for pid, name in connection.execute(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ):
            groups.setdefault(f"db ({name.removeprefix('chat-dualwrite-') or 'bench'})", []).append(
                pid
            )
    return groups


class CpuMeter:
    """CPU seconds used by groups of processes between `start()` and `stop()`.

    `groups` names the processes to watch (called at both ends, so a process that appears in
    between is counted from zero; one that exits in between is lost).
    """

    def __init__(self, groups: Callable[[], dict[str, list[int]]]) -> None:
        self.groups = groups
        self._start: dict[int, float] = {}

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for group, pids in self.groups().items():
            for pid in pids:
                used = cpu_seconds(pid)
                if used is not None:
                    out[pid] = (group, used)
        return out

    def start(self) -> None:
        self._start = {pid: used for pid, (_, used) in self._snapshot().items()}

    def stop(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for pid, (group, used) in self._snapshot().items():
            spent[group] = spent.get(group, 0.0) + used - self._start.get(pid, 0.0)
        return spent


def service_cpu_groups(
    database_url: str, broker: Process, api_process: Process | None, worker_process: Process | None
) -> Callable[[], dict[str, list[int]]]:
    """The processes of a bench run: API, worker (main and pool), Redis, their database
    backends, and the bench's own process (its client threads)."""

    def groups() -> dict[str, list[int]]:
        found: dict[str, list[int]] = {"bench client": [os.getpid()], "redis": [broker.pid]}
        if api_process is not None:
            found["api"] = [api_process.pid]
        if worker_process is not None:
            found["worker"] = [worker_process.pid, *worker_process.children()]
        found.update(database_backends(database_url))
        return found

    return groups
