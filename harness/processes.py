"""Process launchers and waits shared by `tests/` and `bench/`: a Celery worker, beat, the API
and a redis-server of their own, each in its own session so that it and its children stop
together with `os.killpg` (never `kill -TERM -PID` through a shell)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import redis

ROOT = Path(__file__).resolve().parent.parent
QUEUES = "dualwrite.sync,dualwrite.maintenance"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    *,
    what: str = "the condition",
) -> Any:
    """Poll `check` until it returns something truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)


class Process:
    """A subprocess in its own session, its output appended to `log_path` (or discarded).
    `start` waits until `ready` is in the log written since, or `ready()` is true."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path | None,
        ready: str | Callable[[], bool] | None = None,
    ) -> None:
        self.argv, self.env, self.log_path, self.ready = argv, env, log_path, ready
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, timeout: float = 60.0) -> Self:
        if self.log_path is None:
            self.proc = self._spawn(subprocess.DEVNULL)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                self.proc = self._spawn(log)
        if self.ready is not None:
            wait_until(self._ready, timeout, 0.1, what=f"{self.argv[:4]} to start")
        return self

    def _spawn(self, out: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        """What the process wrote since its last start."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[self._offset :].decode(errors="replace")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            code = self.proc.returncode
            raise AssertionError(f"{self.argv[:4]} exited with {code}:\n{self.log()}")
        return self.ready() if callable(self.ready) else str(self.ready) in self.log()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def child_pids(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill(self, timeout: float = 20.0) -> None:
        """SIGKILL the whole group: a crashed container."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole group; SIGKILL it if it has not exited after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)


def fresh_directory(path: Path) -> Path:
    """`path`, created and emptied: a PROMETHEUS_MULTIPROC_DIR at the start of its processes."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class WorkerProcess(Process):
    """`celery -A tasks worker` on the sync and maintenance queues; `args` go last. Its node
    serves its metrics on a free port of its own (`metrics_url`), its children counting in a
    PROMETHEUS_MULTIPROC_DIR of its own, emptied at each start, unless `env` names a port."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str, *args: str) -> None:
        argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO"]
        argv += ["-n", f"{name}@%h", "-Q", QUEUES, "--without-gossip", "--without-mingle", *args]
        self.metrics_dir: Path | None = None
        if "WORKER_METRICS_PORT" not in env:
            self.metrics_dir = Path(tempfile.mkdtemp(prefix="dualwrite-worker-metrics-"))
            env = {
                **env,
                "WORKER_METRICS_PORT": str(free_port()),
                "WORKER_METRICS_ADDRESS": "127.0.0.1",
                "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            }
        super().__init__(argv, env, log_path, " ready.")
        self.name = name
        port = int(env["WORKER_METRICS_PORT"])
        self.metrics_url = f"http://127.0.0.1:{port}/metrics" if port else None

    def start(self, timeout: float = 60.0) -> Self:
        if self.metrics_dir is not None:
            fresh_directory(self.metrics_dir)
        return super().start(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        super().stop(timeout)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def samples(self, name: str) -> list[Any]:
        """The samples called `name` (`dualwrite_tasks_total`, `..._bucket`) this node serves."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        assert self.metrics_url, "this worker serves no metrics"
        body = httpx.get(self.metrics_url, timeout=10).raise_for_status().text
        return [
            sample
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == name
        ]


class BeatProcess(Process):
    """`celery -A tasks beat`, its schedule file beside its log."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        schedule = str(log_path.with_suffix(".schedule"))
        argv = [sys.executable, "-m", "celery", "-A", "tasks", "beat", "--loglevel=INFO"]
        super().__init__([*argv, "-s", schedule], env, log_path, "beat: Starting")


class UpgradeProcess(Process):
    """`alembic upgrade head` against `url`, `env` added to the environment; `kill` stops it
    halfway, as a crash would."""

    def __init__(self, url: str, log_path: Path, **env: str) -> None:
        argv = [sys.executable, "-m", "alembic", "upgrade", "head"]
        super().__init__(argv, {**os.environ, "DATABASE_URL": url, **env}, log_path)


class ApiProcess(Process):
    """`uvicorn app.main:app` (or another `app`) on a port of its own, started once it answers
    `/healthz`. `quiet` leaves out uvicorn's INFO lines and its access log. With `metrics_dir`
    (which the caller empties first: processes of one instance may share it) its processes
    count in PROMETHEUS_MULTIPROC_DIR mode; `workers` is uvicorn's `--workers`."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        *,
        app: str = "app.main:app",
        quiet: bool = True,
        workers: int = 1,
        metrics_dir: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
        argv += ["--port", str(self.port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        if quiet:
            argv += ["--log-level", "warning", "--no-access-log"]
        self.metrics_dir = metrics_dir
        if metrics_dir is not None:
            env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        super().__init__(argv, env, log_path, self.answers)

    def answers(self) -> bool:
        import httpx

        try:
            return httpx.get(self.base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


class RedisServer(Process):
    """A redis-server of its own on a free port, so stopping or pausing it touches nothing else.
    `stop` kills it: nothing is saved, as when a broker crashes."""

    kind = "redis"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        super().__init__([*argv, "--save", "", "--appendonly", "no"], dict(os.environ), None)

    def start(self, timeout: float = 10.0) -> Self:
        super().start()
        wait_until(self.answers, timeout, what="redis-server to answer")
        return self

    def answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        self.kill(timeout)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def broker_env(self) -> dict[str, str]:
        """What a worker or an API needs in its environment to use this broker."""
        return {"REDIS_URL": self.url}

    def drained(self, queue: str = "dualwrite.sync") -> bool:
        """No message of `queue` waits, and none is delivered but unacked."""
        client = self.client()
        return client.llen(queue) == 0 and client.hlen("unacked") == 0
