"""Saturation throughput of the append path in `jsonb_only` and in `dual_write`, with bench.lag's
processes (one API process, a worker prefork -c 2, running in both phases): N keep-alive clients
append in a closed loop, N raised step by step until appends/s stops growing.

    .venv/bin/python -m bench.throughput [--seconds 15] [--chats 300] [--clients 1,2,4,...]
                                         [--rounds 2] [--quick]

Each step appends to fresh chats for `--seconds`, then waits for an empty queue and every row.
Its rate counts only if the worker kept up: at most 20 tasks waiting when sending stopped and
every row in within 2 s (coalescing caps the queue at one task per chat: the catch-up is what
shows a worker falling behind). A ramp stops there, or when twice in a row the rate did not beat
the best by 5%. The phases alternate ABBA over `--rounds`; a phase's saturation is the median of
its rounds' best counted rates. Writes every step to bench/out/throughput.csv.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import infra

PHASES = ("jsonb_only", "dual_write")
TARGET_RATIO = 0.8  # dual_write saturation / jsonb_only saturation
QUEUE_FLAT, CATCH_UP_S, GROWTH = 20, 2.0, 1.05
ROWS = "SELECT count(*) FROM copilot_chat_messages WHERE chat_id = ANY(%s::uuid[])"
COLUMNS = "round|phase|clients|appends/s|p50 ms|p99 ms|queue max|queue end|rows in s|kept up"


@dataclass
class Step:
    """N clients for a fixed time: the answers, the queue, the rows' catch-up, CPU by group."""

    round: int
    phase: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    queue_max: int = 0
    queue_end: int = 0
    catch_up: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def kept_up(self) -> bool:
        return self.queue_end <= QUEUE_FLAT and self.catch_up < CATCH_UP_S

    def ms(self, p: float) -> float:
        return infra.percentile(self.latencies, p) * 1e3

    def cells(self, groups: list[str]) -> list[Any]:
        """COLUMNS, then the busy cores of `groups`; the first six are the CSV's."""
        head = [self.round, self.phase, self.clients, self.rate, self.ms(50), self.ms(99)]
        cores = [self.cpu.get(g, 0.0) / (self.seconds + self.catch_up) for g in groups]
        return [*head, self.queue_max, self.queue_end, self.catch_up, self.kept_up(), *cores]


def closed_loop(running: infra.Stack, args: argparse.Namespace, step: Step) -> Step:
    """`step.clients` threads append round robin over fresh chats for `--seconds`, each on its own
    connection opened before the clock; then waits until the queue is empty and every row in.
    The API reads the phase from the database in every write: setting it needs no restart."""
    infra.scalar(running.url, "UPDATE dualwrite_phase SET phase = %s", (step.phase,))
    base, headers = args.base, running.headers()
    ids, counter = infra.create_chats(base, headers, args.chats), itertools.count()
    https = [httpx.Client(base_url=base, headers=headers, timeout=30) for _ in range(step.clients)]
    for http in https:
        http.get("/healthz").raise_for_status()
    meter = infra.CpuMeter(running)
    meter.start()
    queue = infra.Poller(running.queue, 0.2).start()
    started = time.perf_counter()

    def client(http: httpx.Client) -> list[float | None]:
        """Seconds per request, None for a failure."""
        mine: list[float | None] = []
        while time.perf_counter() < started + args.seconds:
            url = f"/chats/{ids[next(counter) % len(ids)]}/messages"
            body = {"message": infra.message(uuid.uuid4().hex)}
            sent = time.perf_counter()
            try:
                ok = http.post(url, json=body).status_code == 201
            except httpx.HTTPError:
                ok = False
            mine.append(time.perf_counter() - sent if ok else None)
        return mine

    with ThreadPoolExecutor(len(https)) as pool:
        answers = [x for mine in pool.map(client, https) for x in mine]
    stopped = time.perf_counter()
    step.seconds, step.queue_end = stopped - started, running.queue()
    step.latencies = [x for x in answers if x is not None]
    step.failed = len(answers) - len(step.latencies)
    rows = len(step.latencies) if step.phase == "dual_write" else 0

    def landed() -> bool:
        return running.queue() == 0 and infra.scalar(running.url, ROWS, (ids,)) >= rows

    infra.wait_until(landed, 120, what="every row")
    step.catch_up = time.perf_counter() - stopped
    for group, spent in meter.stop().items():  # the database's backends as one group
        group = "postgres" if group.startswith("db (") else group
        step.cpu[group] = step.cpu.get(group, 0.0) + spent
    queue.stop()
    step.queue_max = max(queue.values(), default=0)
    for http in https:
        http.close()
    return step


def ramp(running: infra.Stack, args: argparse.Namespace, n: int, phase: str) -> list[Step]:
    """Round `n` of a phase: one step per client count, until the worker falls behind or the
    rate stops growing."""
    steps: list[Step] = []
    best, flat = 0.0, 0
    for clients in args.clients:
        step = closed_loop(running, args, Step(n, phase, clients))
        steps.append(step)
        said = f"{phase:<10} clients={clients:<3} {step.rate:7.0f}/s, p99 {step.ms(99):.1f} ms"
        print(f"{said}, queue {step.queue_end}, rows in {step.catch_up:.2f}s", file=sys.stderr)
        flat = 0 if step.rate > best * GROWTH else flat + 1
        best = max(best, step.rate)
        if not step.kept_up() or flat == 2:
            break
    return steps


def report(steps: list[Step], args: argparse.Namespace) -> None:
    groups = sorted({g for s in steps for g in s.cpu})
    infra.show(
        f"closed loop, {args.seconds:g}s per step over {args.chats} fresh chats; busy cores by "
        "group from the start of sending until every row was in",
        [*COLUMNS.split("|"), *(f"{g} cores" for g in groups)],
        [s.cells(groups) for s in steps],
    )
    if failed := sum(s.failed for s in steps):
        print(f"  {failed} append requests failed")
    best: dict[str, list[Step]] = {p: [] for p in PHASES}  # per round, the best counted step
    for (_, phase), ramp_ in itertools.groupby(steps, lambda s: (s.round, s.phase)):
        if counted := [s for s in ramp_ if s.kept_up()]:
            best[phase].append(max(counted, key=lambda s: s.rate))
    rate = {p: statistics.median(s.rate for s in b) if b else float("nan") for p, b in best.items()}
    rows = []
    for phase, at in best.items():
        pooled = [x for s in at for x in s.latencies]
        cpu = [sum(s.cpu.get(g, 0.0) for s in at) * 1e3 / max(1, len(pooled)) for g in groups]
        by_round = ", ".join(f"{s.rate:.0f}" for s in at)
        clients = ", ".join(str(s.clients) for s in at)
        p50, p99 = (infra.percentile(pooled, p) * 1e3 for p in (50, 99))
        rows.append([phase, rate[phase], by_round, clients, p50, p99, *cpu, sum(cpu)])
    infra.show(
        "saturation: per round the best rate while the worker kept up, median over rounds; at "
        "those steps, latency and CPU per append (ms) by group, until every row was in",
        ["phase", "appends/s", "by round", "clients", "p50 ms", "p99 ms", *groups, "total"],
        rows,
    )
    ratio, (base, dual) = rate["dual_write"] / rate["jsonb_only"], rate.values()
    verdict = infra.at_least(ratio, TARGET_RATIO) if ratio == ratio else "n/a: none counted"
    reference = f"jsonb_only {base:.0f}/s, dual_write {dual:.0f}/s"
    figure = ["dual_write saturation / jsonb_only saturation", ratio, reference]
    targets = [[*figure, f">= {TARGET_RATIO}", verdict]]
    infra.show("targets, against jsonb_only measured in this run", infra.FIGURE, targets)
    with (infra.OUT / "throughput.csv").open("w", newline="") as f:
        header = ["round", "phase", "clients", "rate", "p50_ms", "p99_ms", "queue"]
        csv.writer(f).writerows([header, *([*s.cells([])[:6], s.queue_end] for s in steps)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="per step")
    parser.add_argument("--chats", type=int, default=300, help="fresh chats per step")
    parser.add_argument("--clients", default="1,2,4,8,16,32", help="client counts, in order")
    parser.add_argument("--rounds", type=int, default=2, help="ramps per phase, ABBA order")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps this working")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.chats, args.clients, args.rounds = 1, 20, "1,4", 1
    args.clients = [int(c) for c in args.clients.split(",")]
    # One user stands for every client here: the per-user cap would turn most of them away.
    with infra.stack("cdw_throughput", USER_CONCURRENCY="64", USER_QUEUE="64") as running:
        running.worker("worker", "-c", "2")
        args.base = running.api().base
        print("warming up: one step per phase at the most clients...", file=sys.stderr)
        for phase in PHASES:
            closed_loop(running, args, Step(0, phase, max(args.clients)))
        steps = [
            step
            for n in range(1, args.rounds + 1)
            for phase in (PHASES if n % 2 else PHASES[::-1])
            for step in ramp(running, args, n, phase)
        ]
    report(steps, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
