"""Worker memory over a long run: a mix of real sync tasks (appends, pairs, snapshot edits,
duplicate deliveries, deleted chats) through a prefork worker (-c 2, no max_tasks_per_child, so
growth after warm-up is real), the producer paced to keep the queue short; RSS of the main
process and each pool child sampled every second. Writes bench/out/memory_rss.csv and .png.

    .venv/bin/python -m bench.memory [--tasks 200000] [--chats 300] [--quick]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app import schemas
from app.jobs import SYNC_CHAT, SYNC_MESSAGES, Job
from app.services import chats as service
from app.settings import get_settings
from bench import infra

USER = "bench"
TOLERANCE_PCT = 2.0  # growth after warm-up within this is reported as noise, not growth
KINDS = ("VmRSS", "RssAnon")
GROWTH = ["process", "first", "start", "min", "median", "peak", "end", "growth", "growth %"]


@dataclass
class ChatState:
    id: uuid.UUID
    ids: list[str] = field(default_factory=list)
    version: int = 0


class Producer:
    """Mutates chats by the service's own operations (as the API does), and sends syncs of
    deleted chats and duplicate deliveries as they are."""

    def __init__(self, running: infra.Stack, factory: Any, chats: int, seed: int) -> None:
        from tasks.publish import bounded_publisher, producer

        settings = get_settings()
        self.factory, self.redis_url = factory, running.broker.url
        self.bounded, self.raw = bounded_publisher(settings), producer(settings)
        self.rng, self.sent, self.ops = random.Random(seed), 0, Counter[str]()
        self.max_messages = 60
        self.chats = [self._create() for _ in range(chats)]

    def _publish(self, job: Job) -> None:
        self.bounded(job)
        self.sent += 1

    def _do(self, operation: Callable[..., Any], *args: Any) -> Any:
        return infra.unit_of_work(self.factory, self._publish, USER, operation, *args)

    def _send(self, task: str, *args: Any) -> None:
        self.raw.send_task(task, args=list(args))
        self.sent += 1

    def _create(self) -> ChatState:
        new = schemas.CreateChat(title="memory", model="m")
        return ChatState(self._do(service.create_chat, new).id)

    def _element(self, role: str) -> dict[str, str]:
        size = self.rng.randint(600, infra.CONTENT_BYTES)
        return infra.message(f"{role[0]}-{uuid.uuid4().hex[:16]}", role, size)

    def _edit(self, ctx: Any, chat_id: uuid.UUID) -> int:
        """A snapshot edit: the first message dropped (a soft delete), the last rewritten."""
        messages = service.get_chat(ctx, chat_id)[1][1:]
        if messages:
            messages[-1]["content"] = f"edited {self.rng.random()}"
        body = schemas.ReplaceMessages.model_validate({"messages": messages})
        return service.replace_messages(ctx, chat_id, body)

    def step(self) -> None:
        index = self.rng.randrange(len(self.chats))
        chat = self.chats[index]
        r = self.rng.random()
        if len(chat.ids) >= self.max_messages or (r >= 0.97 and chat.ids):
            # Delete the chat; a task for it (queued, or this one) finds it missing.
            self._do(service.delete_chat, chat.id)
            self._send(SYNC_CHAT, str(chat.id), chat.version)
            self.chats[index] = self._create()
            kind = "delete chat"
        elif r < 0.70 or not chat.ids:
            body = schemas.AppendMessage.model_validate({"message": self._element("user")})
            appended = self._do(service.append_user_message, chat.id, body)
            chat.ids, chat.version = chat.ids + appended.message_ids, appended.version
            kind = "append"
        elif r < 0.82:
            pair = {"user": self._element("user"), "assistant": self._element("assistant")}
            pair_body = schemas.InboxPair.model_validate(pair)
            appended = self._do(service.append_inbox_pair, chat.id, pair_body)
            chat.ids, chat.version = chat.ids + appended.message_ids, appended.version
            kind = "append pair"
        elif r < 0.88:
            chat.version = self._do(self._edit, chat.id)
            chat.ids.pop(0)
            kind = "snapshot edit"
        else:  # a duplicate delivery of an already published version
            self._send(SYNC_MESSAGES, str(chat.id), chat.ids[-1:], chat.version)
            kind = "duplicate"
        self.ops[kind] += 1

    def run(self, tasks: int, queue_cap: int) -> None:
        """Steps until `tasks` tasks are sent, waiting whenever the queue is above `queue_cap`."""
        while self.sent < tasks:
            self.step()
            if self.sent % 50 == 0:
                infra.wait_until(lambda: infra.queue_length(self.redis_url) <= queue_cap, 600, 0.02)


Sample = tuple[int, dict[str, dict[str, int]]]  # tasks run; KiB by KINDS, then by process


def sample(worker: Any, redis: Any) -> Sample:
    """Tasks the worker has run; VmRSS and RssAnon of its main process and each pool child."""
    pids = {"main": worker.pid, **{f"child {p}": p for p in worker.child_pids()}}
    done = sum(infra.task_outcomes([worker]).values())
    sizes = {k: {n: infra.proc_status(p, k) for n, p in pids.items()} for k in KINDS}
    return done, {k: {n: kib for n, kib in sizes[k].items() if kib} for k in KINDS}


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
    grown = end - start
    return [*kib, grown, 100 * grown / start, end - statistics.median(half[:5]), slope * 1e4]


def series(samples: list[Sample], kind: str) -> dict[str, list[tuple[int, int]]]:
    """(tasks run, KiB of `kind`) for each process and their total."""
    names = sorted({n for _, kib in samples for n in kib[kind]}, key=lambda n: (n != "main", n))
    out = {n: [(done, kib[kind][n]) for done, kib in samples if n in kib[kind]] for n in names}
    return {**out, "total": [(done, sum(kib[kind].values())) for done, kib in samples]}


def report(
    samples: list[Sample], producer: Producer, outcomes: dict[str, int], seconds: float, args: Any
) -> None:
    done = samples[-1][0]
    print(f"\nworker RSS, prefork -c 2, no max_tasks_per_child: {done:,} tasks in {seconds:.0f}s")
    infra.show(
        "producer operations", ["operation", "count"], sorted(map(list, producer.ops.items()))
    )
    infra.show("tasks run", ["task | outcome", "count"], sorted(map(list, outcomes.items())))
    targets = []
    for kind in KINDS:
        rows: list[list[Any]] = [
            [n, *growth(points, args.warmup)] for n, points in series(samples, kind).items()
        ]
        infra.show(
            f"{kind} (KiB); start = median of the first 5 samples once {args.warmup:,} tasks "
            "had run (warm-up), end = median of the last 5; 2nd half = growth over its second half",
            [*GROWTH, "2nd half", "per 10k tasks"],
            rows,
        )
        total = rows[-1]
        for name, pct in (("end vs start", total[8]), ("second half", 100 * total[9] / total[2])):
            figure, wanted = f"worker {kind} (total), {name}", f"<= {TOLERANCE_PCT:.1f}% (noise)"
            verdict = infra.verdict(max(pct, 0.0), TOLERANCE_PCT)
            targets.append([figure, f"{pct:+.2f}%", "after warm-up", wanted, verdict])
    infra.show("target: the worker does not grow after warm-up", infra.FIGURE, targets)
    rows = [
        [done, n, rss, kib["RssAnon"].get(n, "")]
        for done, kib in samples
        for n, rss in sorted(kib["VmRSS"].items())
    ]
    infra.write_csv("memory_rss.csv", ["tasks_done", "process", "vmrss_kib", "rssanon_kib"], rows)

    def draw(ax: Any) -> None:
        for name, points in series(samples, "VmRSS").items():
            ax.plot([d for d, _ in points], [k / 1024 for _, k in points], label=name)
        ax.axvline(args.warmup, color="grey", linestyle=":", label="end of warm-up")
        ax.set(xlabel="tasks run", ylabel="VmRSS (MiB)", title="Celery worker RSS, prefork -c 2")

    infra.plot(infra.OUT / "memory_rss.png", draw)


def main() -> int:
    args = infra.options(
        __doc__,
        {"tasks": 600, "warmup": 200, "chats": 30},
        tasks=200_000,
        warmup=(10_000, "tasks before 'start'"),
        chats=300,
        queue_cap=(20, "pace the producer above it"),
        every=(1.0, "seconds between samples"),
    )
    # The producer's writes need no fsync each; the worker's commits are untouched.
    with infra.stack("cdw_memory") as running, infra.sessions(running.url, fsync=False) as factory:
        worker, redis = running.worker("worker", "-c", "2"), running.broker.client()
        producer = Producer(running, factory, args.chats, seed=1)
        sampler = infra.Poller(lambda: sample(worker, redis), args.every).start()
        try:
            producer.run(args.tasks, args.queue_cap)
            infra.wait_until(
                lambda: sum(infra.task_outcomes([worker]).values()) >= producer.sent,
                300,
                what="the worker to run every task",
            )
            finished = time.perf_counter() - sampler.started
            time.sleep(3 * args.every)  # a few samples of the idle worker at the end
        finally:
            sampler.stop()
        outcomes = infra.task_outcomes([worker])
    report(sampler.values(), producer, outcomes, finished, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
