"""Worker memory over a long run: a mix of real sync tasks (appends, pairs, snapshot edits,
duplicate deliveries, deleted chats) through a prefork worker (-c 2, as deployed), sampling the
resident set size of the main process and of each pool child every second.

    .venv/bin/python -m bench.memory [--tasks 200000] [--chats 300] [--quick]

The producer writes the JSONB with the service's repositories and publishes with its bounded
publisher (coalescing per chat, as the API does), paced so that the queue stays short and nearly
every task does real work. No `max_tasks_per_child` is set, so the pool children live for the
whole run and any growth after warm-up is real. Writes bench/out/memory_rss.csv and .png.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench import infra

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

    def __init__(self, database_url: str, broker: Any, chats: int, seed: int) -> None:
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
        size = self.rng.randint(600, infra.CONTENT_BYTES)
        return infra.message(f"{role[0]}-{uuid.uuid4().hex[:16]}", role, size)

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
    done: int  # tasks the worker has run
    # KiB per process ("main" or the pool child's pid): VmRSS and RssAnon.
    rss: dict[str, int]
    anon: dict[str, int]


def sample(worker: Any, redis: Any) -> Sample:
    """RSS of the worker's main process and each pool child."""
    pids = {"main": worker.pid, **{f"child {p}": p for p in worker.child_pids()}}
    sizes = {k: {n: infra.proc_status(p, k) for n, p in pids.items()} for k in ("VmRSS", "RssAnon")}
    done = sum(infra.task_outcomes(redis).values())
    rss, anon = ({n: kib for n, kib in sizes[k].items() if kib} for k in ("VmRSS", "RssAnon"))
    return Sample(done, rss, anon)


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

    stop = threading.Event()
    with infra.stack("cdw_memory") as running:
        worker, redis = running.worker("worker", "-c", "2"), running.broker.client()
        producer = Producer(running.url, running.broker, args.chats, seed=1)
        sampler = infra.Poller(lambda: sample(worker, redis), args.every).start()
        try:
            producer.run(args.tasks, args.queue_cap, stop)
            infra.wait_until(
                lambda: sum(infra.task_outcomes(redis).values()) >= producer.sent,
                300,
                what="the worker to run every task",
            )
            finished = time.perf_counter() - sampler.started
            time.sleep(3 * args.every)  # a few samples of the idle worker at the end
        finally:
            stop.set()
            sampler.stop()
            producer.close()
        outcomes = redis.hgetall("dualwrite:metrics")
    samples = [s for _, s in sampler.samples]
    report(samples, producer, outcomes, finished, args)
    return 0


def growth(points: list[tuple[int, int]], warmup: int) -> list[float]:
    """KiB: first, start, min, median, peak, end; growth (KiB, %), over the second half, and
    KiB per 10,000 tasks (least squares), once `warmup` tasks have run. A cache filling up grows
    early and then stops; a leak keeps growing: the second half tells them apart."""
    warm = [(d, kib) for d, kib in points if d >= warmup] or points[-1:]
    values = [kib for _, kib in warm]
    start, end = statistics.median(values[:5]), statistics.median(values[-5:])
    half = [kib for d, kib in warm if d >= (warm[0][0] + warm[-1][0]) / 2] or values
    xs = [float(d) for d, _ in warm]
    mx, my = statistics.fmean(xs), statistics.fmean(values)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True)) / var if var else 0
    kib = [points[0][1], start, min(values), statistics.median(values), max(values), end]
    return [
        *kib,
        end - start,
        100 * (end - start) / start,
        end - statistics.median(half[:5]),
        slope * 1e4,
    ]


def series(samples: list[Sample], kind: str) -> dict[str, list[tuple[int, int]]]:
    """(tasks done, KiB) for each process and their total."""
    names = sorted({n for s in samples for n in getattr(s, kind)}, key=lambda n: n != "main")
    out = {
        n: [(s.done, getattr(s, kind)[n]) for s in samples if n in getattr(s, kind)] for n in names
    }
    return {**out, "total": [(s.done, sum(getattr(s, kind).values())) for s in samples]}


def report(
    samples: list[Sample],
    producer: Producer,
    outcomes: dict[bytes, bytes],
    seconds: float,
    args: argparse.Namespace,
) -> None:
    done = samples[-1].done
    print(f"\nworker RSS, prefork -c 2, no max_tasks_per_child: {done:,} tasks in {seconds:.0f}s")
    infra.show(
        "producer operations",
        ["operation", "count"],
        [list(kv) for kv in sorted(producer.ops.items())],
    )
    tasks = sorted(
        (k.decode().split("|", 1)[1], int(float(v)))
        for k, v in outcomes.items()
        if k.startswith(b"tasks|")
    )
    infra.show("tasks run", ["task | outcome", "count"], [list(kv) for kv in tasks])
    targets = []
    for kind, label in (("rss", "VmRSS"), ("anon", "RssAnon")):
        rows = [
            [name, *growth(points, args.warmup)] for name, points in series(samples, kind).items()
        ]
        infra.show(
            f"{label} (KiB); start = median of the first 5 samples once {args.warmup:,} tasks "
            "had run (warm-up), end = median of the last 5; 2nd half = growth over its second half",
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
                "per 10k tasks",
            ],
            rows,
        )
        total = rows[-1]
        for name, pct in (("end vs start", total[8]), ("second half", 100 * total[9] / total[2])):
            targets.append(
                [
                    f"worker {label} (total), {name}",
                    f"{pct:+.2f}%",
                    "after warm-up",
                    f"<= {TOLERANCE_PCT:.1f}% (noise)",
                    infra.verdict(max(pct, 0.0), TOLERANCE_PCT),
                ]
            )
    infra.show("target: the worker does not grow after warm-up", infra.FIGURE, targets)
    with (infra.OUT / "memory_rss.csv").open("w", newline="") as f:
        rows = [
            [s.done, n, kib, s.anon.get(n, "")] for s in samples for n, kib in sorted(s.rss.items())
        ]
        csv.writer(f).writerows([["tasks_done", "process", "vmrss_kib", "rssanon_kib"], *rows])

    def draw(ax: Any) -> None:
        for name, points in series(samples, "rss").items():
            ax.plot([d for d, _ in points], [k / 1024 for _, k in points], label=name)
        ax.axvline(args.warmup, color="grey", linestyle=":", label="end of warm-up")
        ax.set(xlabel="tasks run", ylabel="VmRSS (MiB)", title="Celery worker RSS, prefork -c 2")

    infra.plot(infra.OUT / "memory_rss.png", draw)


if __name__ == "__main__":
    sys.exit(main())
