"""Worker memory over a long run: a mix of real sync tasks (appends, pairs, snapshot edits,
duplicate deliveries, deleted chats) through a prefork worker (-c 2, as deployed), sampling the
resident set size of the main process and of each pool child every second.

    .venv/bin/python bench/memory.py [--tasks 200000] [--chats 300] [--quick]

The producer writes the JSONB with the service's repositories and publishes with its bounded
publisher (coalescing per chat, as the API does), paced so that the queue stays short and nearly
every task does real work. No `max_tasks_per_child` is set, so the pool children live for the
whole run and any growth after warm-up is real. Writes bench/out/memory_rss.csv and .png.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import infra

CONTENT_BYTES = 850
USER = "bench"
TOLERANCE_PCT = 2.0  # growth after warm-up within this is reported as noise, not growth


@dataclass
class ChatState:
    id: uuid.UUID
    ids: list[str] = field(default_factory=list)
    version: int = 0


class Producer:
    """Mutates chats with the service's repositories, one transaction each, and publishes the
    sync the API would publish after that commit."""

    def __init__(self, database_url: str, broker: infra.RedisServer, chats: int, seed: int) -> None:
        from sqlalchemy import create_engine

        from app.db import make_sessionmaker
        from app.settings import Settings
        from tasks.publish import bounded_publisher, producer

        settings = Settings(database_url=database_url, redis_url=broker.url)
        # The bench's own writes need no fsync each; the worker's commits are untouched.
        self.engine = create_engine(
            settings.database_url,
            pool_size=1,
            connect_args={"options": "-c timezone=UTC -c synchronous_commit=off"},
        )
        self.sessions = make_sessionmaker(self.engine)
        self.publish = bounded_publisher(settings)
        self.raw = producer(settings)
        self.redis = broker.client()
        self.rng = random.Random(seed)
        self.max_messages = 60
        self.sent = 0
        self.ops: dict[str, int] = {}
        self.chats = [self._create() for _ in range(chats)]

    def _tx(self) -> Any:
        from app.db import transaction

        return transaction(self.sessions)

    def _create(self) -> ChatState:
        from app.repositories import chats as repo

        with self._tx() as session:
            chat = repo.create(
                session, user_id=USER, title="memory", model="m", workflow_id=None, messages=[]
            )
        return ChatState(chat.id)

    def _element(self, role: str) -> dict[str, str]:
        return {
            "id": f"{role[0]}-{uuid.uuid4().hex[:16]}",
            "role": role,
            "content": ("lorem ipsum dolor sit amet " * 40)[: self.rng.randint(600, CONTENT_BYTES)],
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }

    def _job(self, task: str, *args: Any, coalesce: str | None) -> None:
        from app.jobs import Job

        if self.publish(Job(task, args, coalesce)):
            self.sent += 1

    def step(self) -> None:
        from app.jobs import SYNC_CHAT, SYNC_MESSAGES
        from app.repositories import chats as repo

        index = self.rng.randrange(len(self.chats))
        chat = self.chats[index]
        r = self.rng.random()
        if len(chat.ids) >= self.max_messages or (r >= 0.97 and chat.ids):
            # Delete the chat; a task for it (queued, or this one) finds it missing.
            with self._tx() as session:
                repo.delete(session, chat.id, USER)
            self.raw.send_task(SYNC_CHAT, args=[str(chat.id), chat.version])
            self.sent += 1
            self.chats[index] = self._create()
            kind = "delete chat"
        elif r < 0.70 or not chat.ids:
            element = self._element("user")
            element["streamId"] = element["id"]
            with self._tx() as session:
                version = repo.append(
                    session, chat.id, USER, [element], set_active_stream=element["id"]
                )
            assert version is not None
            chat.ids.append(element["id"])
            chat.version = version
            self._job(SYNC_MESSAGES, str(chat.id), [element["id"]], version, coalesce=str(chat.id))
            kind = "append"
        elif r < 0.82:
            pair = [self._element("user"), self._element("assistant")]
            with self._tx() as session:
                version = repo.append(session, chat.id, USER, pair)
            assert version is not None
            chat.ids += [e["id"] for e in pair]
            chat.version = version
            self._job(
                SYNC_MESSAGES, str(chat.id), [e["id"] for e in pair], version, coalesce=str(chat.id)
            )
            kind = "append pair"
        elif r < 0.88:
            # A snapshot edit: the first message dropped (a soft delete), the last rewritten.
            with self._tx() as session:
                messages = repo.get_messages(session, chat.id)
                messages.pop(0)
                if messages:
                    messages[-1]["content"] = f"edited {self.rng.random()}"
                version = repo.replace_messages(session, chat.id, USER, messages)
            assert version is not None
            chat.ids.pop(0)
            chat.version = version
            self._job(SYNC_CHAT, str(chat.id), version, coalesce=str(chat.id))
            kind = "snapshot edit"
        else:
            # A duplicate delivery of an already published version.
            self.raw.send_task(SYNC_MESSAGES, args=[str(chat.id), chat.ids[-1:], chat.version])
            self.sent += 1
            kind = "duplicate"
        self.ops[kind] = self.ops.get(kind, 0) + 1

    def run(self, tasks: int, queue_cap: int, stop: threading.Event) -> None:
        while self.sent < tasks and not stop.is_set():
            self.step()
            if self.sent % 50 == 0:
                while infra.queue_length(self.redis) > queue_cap and not stop.is_set():
                    time.sleep(0.02)

    def close(self) -> None:
        self.engine.dispose()


@dataclass
class Sample:
    t: float
    done: int
    # KiB per process ("main" or the pool child's pid): VmRSS and RssAnon.
    rss: dict[str, int]
    anon: dict[str, int]


class Sampler:
    """RSS of the worker's main process and each pool child, every `every` seconds."""

    def __init__(self, worker: infra.Process, broker: infra.RedisServer, every: float) -> None:
        self.worker, self.redis, self.every = worker, broker.client(), every
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.monotonic()

    def sample(self) -> Sample:
        pids = {"main": self.worker.pid, **{f"child {p}": p for p in self.worker.children()}}
        rss = {name: infra.rss_kib(pid) for name, pid in pids.items()}
        anon = {name: infra.rss_kib(pid, "RssAnon") for name, pid in pids.items()}
        sample = Sample(
            time.monotonic() - self.started,
            infra.worker_tasks_done(self.redis),
            {name: kib for name, kib in rss.items() if kib is not None},
            {name: kib for name, kib in anon.items() if kib is not None},
        )
        self.samples.append(sample)
        return sample

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=10_000, help="tasks before 'start'")
    parser.add_argument("--chats", type=int, default=300)
    parser.add_argument("--queue-cap", type=int, default=20, help="pace the producer above it")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps this working")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.warmup, args.chats = 600, 200, 30

    infra.services_up()
    broker = infra.RedisServer().start()
    worker: infra.Process | None = None
    stop = threading.Event()
    try:
        with infra.database("cdw_memory") as database_url:
            env = infra.service_env(database_url, broker.url)
            os.environ.update(env)
            worker = infra.worker(env, "worker", 2).start()
            producer = Producer(database_url, broker, args.chats, seed=1)
            started = time.monotonic()
            try:
                with Sampler(worker, broker, args.every) as sampler:
                    thread = threading.Thread(
                        target=producer.run, args=(args.tasks, args.queue_cap, stop)
                    )
                    thread.start()
                    last_report = time.monotonic()
                    while thread.is_alive():
                        thread.join(1)
                        if time.monotonic() - last_report > 30 and sampler.samples:
                            last = sampler.samples[-1]
                            print(
                                f"{last.t:5.0f}s  {last.done:,} tasks done  "
                                f"RSS {sum(last.rss.values()) / 1024:.1f} MiB",
                                file=sys.stderr,
                            )
                            last_report = time.monotonic()
                    infra.wait_until(
                        lambda: infra.worker_tasks_done(sampler.redis) >= producer.sent,
                        300,
                        "the worker to run every task",
                    )
                    finished = time.monotonic()
                    time.sleep(3 * args.every)  # a few samples of the idle worker at the end
                    sampler.sample()
                outcomes = broker.client().hgetall("dualwrite:metrics")
            finally:
                stop.set()
                producer.close()
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()

    report(sampler.samples, producer, outcomes, finished - started, args)
    return 0


def report(
    samples: list[Sample],
    producer: Producer,
    outcomes: dict[bytes, bytes],
    seconds: float,
    args: argparse.Namespace,
) -> None:
    mib = 1 / 1024
    done = samples[-1].done
    print(
        f"\nworker RSS (MiB), prefork -c 2, no max_tasks_per_child: {done:,} tasks in "
        f"{seconds:.0f}s ({done / seconds:.0f}/s), sampled every {args.every:g}s\n"
    )
    tasks = sorted(
        (k.decode().split("|", 1)[1], int(float(v)))
        for k, v in outcomes.items()
        if k.startswith(b"tasks|")
    )
    print(
        infra.table(
            ["producer operation", "count"], [[k, v] for k, v in sorted(producer.ops.items())]
        )
    )
    print()
    print(infra.table(["task | outcome", "count"], [[k, v] for k, v in tasks]))

    growth_pct: dict[str, float] = {}
    for kind in ("rss", "anon"):
        label = {"rss": "VmRSS", "anon": "RssAnon"}[kind]
        series = _series(samples, kind)
        rows = []
        for name, points in series:
            warm = [(d, kib) for d, kib in points if d >= args.warmup] or points[-1:]
            values = [kib for _, kib in warm]
            start = statistics.median(values[:5])
            end = statistics.median(values[-5:])
            growth = end - start
            # A cache filling up grows early and then stops; a leak keeps growing. The second
            # half of the run after warm-up tells them apart.
            half = [kib for d, kib in warm if d >= (warm[0][0] + warm[-1][0]) / 2] or values
            late = end - statistics.median(half[:5])
            rows.append(
                [
                    name,
                    points[0][1] * mib,
                    start * mib,
                    min(values) * mib,
                    statistics.median(values) * mib,
                    max(values) * mib,
                    end * mib,
                    growth * mib,
                    100 * growth / start,
                    late * mib,
                    _slope(warm) * 10_000,
                ]
            )
            if name == "total":
                growth_pct[f"{label}, end vs start"] = 100 * growth / start
                growth_pct[f"{label}, second half"] = 100 * late / start
        print(
            f"\n{label} (MiB); start = median of the first 5 samples once {args.warmup:,} tasks"
            " had run (warm-up), end = median of the last 5; 2nd half = growth over the second"
            " half of the tasks after warm-up\n"
        )
        print(
            infra.table(
                [
                    "process",
                    "first",
                    "start",
                    "min",
                    "median",
                    "peak",
                    "end",
                    "growth",
                    "growth %",
                    "2nd half",
                    "KiB/10k tasks",
                ],
                rows,
            )
        )
    print("\ntarget, measured in this run\n")
    print(
        infra.table(
            ["target", "measured", "limit", "result"],
            [
                [
                    f"worker {label} (total) does not grow after warm-up",
                    f"{pct:+.2f}%",
                    f"<= {TOLERANCE_PCT:.1f}% (noise)",
                    infra.verdict(max(pct, 0.0), TOLERANCE_PCT),
                ]
                for label, pct in growth_pct.items()
            ],
        )
    )
    series = _series(samples, "rss")
    write_outputs(samples, series, args)


def _series(samples: list[Sample], kind: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """(process, [(tasks done, KiB)]) for each process and their total."""
    names = sorted({name for s in samples for name in getattr(s, kind)}, key=lambda n: n != "main")
    series = [
        (name, [(s.done, getattr(s, kind)[name]) for s in samples if name in getattr(s, kind)])
        for name in names
    ]
    series.append(("total", [(s.done, sum(getattr(s, kind).values())) for s in samples]))
    return series


def _slope(points: list[tuple[int, int]]) -> float:
    """Least-squares KiB per task."""
    if len(points) < 2:
        return 0.0
    xs = [float(d) for d, _ in points]
    ys = [float(k) for _, k in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def write_outputs(
    samples: list[Sample], series: list[tuple[str, list[tuple[int, int]]]], args: argparse.Namespace
) -> None:
    infra.OUT.mkdir(parents=True, exist_ok=True)
    with (infra.OUT / "memory_rss.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seconds", "tasks_done", "process", "vmrss_kib", "rssanon_kib"])
        for s in samples:
            for name, kib in sorted(s.rss.items()):
                out.writerow([f"{s.t:.1f}", s.done, name, kib, s.anon.get(name, "")])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series:
        ax.plot([d for d, _ in points], [k / 1024 for _, k in points], label=name)
    ax.axvline(args.warmup, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("tasks run")
    ax.set_ylabel("VmRSS (MiB)")
    ax.set_title("Celery worker RSS, prefork -c 2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(infra.OUT / "memory_rss.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {infra.OUT / 'memory_rss.png'} and memory_rss.csv")


if __name__ == "__main__":
    sys.exit(main())
