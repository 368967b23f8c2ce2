"""Request overhead of the dual-write: the same appends through the API in `jsonb_only` and in
`dual_write` (a worker running in both), alternating over runs, each on fresh chats after a
warm-up of a restarted API; and `no_trigger` (`jsonb_only` without the version triggers) for the
triggers' own cost; and `paused_worker` (`dual_write` with the worker stopped during the
requests) for the request path's own cost. Targets: dual_write / jsonb_only latency, p50 <=
1.10x and p99 <= 1.25x.

    .venv/bin/python -m bench.overhead [--requests 2000] [--chats 300] [--runs 3] [--clients 1,4]
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import sys
from collections import Counter
from dataclasses import dataclass

import httpx

from bench import infra

# `paused_worker`: `dual_write` with the worker stopped (SIGSTOP) while the requests run, its
# copies made after them: the request path's own cost, without the copies' CPU beside it.
PHASES = ("no_trigger", "jsonb_only", "dual_write", "paused_worker")
PUBLISH_METRICS = {
    "dualwrite_publish_seconds_sum": "publish seconds",
    'dualwrite_enqueued_total{task="chats.sync_messages"}': "tasks sent",
    'dualwrite_coalesced_total{task="chats.sync_messages"}': "coalesced",
}
TARGETS = {"p50": 1.10, "p99": 1.25}
LATENCY = ["phase", "clients", "runs", "requests", "min", "median p50", "median p99"]


@dataclass
class Measured:
    latencies: list[float]
    cpu: dict[str, float]  # CPU seconds by process group
    publish: Counter[str]  # the API's publish counters over the run (0 if never published)


Results = dict[tuple[str, int], list[Measured]]  # by phase and number of clients


def publish_counters(base: str) -> dict[str, float]:
    """The API's own publish metrics (time spent publishing after commits, tasks sent)."""
    found = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in PUBLISH_METRICS:
            found[PUBLISH_METRICS[name]] = float(value)
    return found


def put_phase(url: str, phase: str) -> None:
    """The phase lives in the database; `no_trigger` is `jsonb_only` without the triggers."""
    stored = {"no_trigger": "jsonb_only", "paused_worker": "dual_write"}.get(phase, phase)
    infra.scalar(url, "UPDATE dualwrite_phase SET phase = %s", (stored,))
    triggers = "DISABLE" if phase == "no_trigger" else "ENABLE"
    infra.scalar(url, f"ALTER TABLE copilot_chats {triggers} TRIGGER USER")


def measure(running: infra.Stack, args: argparse.Namespace) -> Results:
    """Every phase and number of clients, `args.runs` times, in ABBA order."""
    results: Results = {(p, c): [] for p in PHASES for c in args.clients}
    headers = running.headers()
    worker = running.worker()
    api = None
    for run in range(args.runs):
        for phase in PHASES if run % 2 == 0 else PHASES[::-1]:
            if api is not None:
                api.stop()
                running.processes.remove(api)
            put_phase(running.url, phase)
            api = running.api(f"api-{phase}")
            base = api.base
            warm = infra.create_chats(base, headers, max(1, min(args.chats, 50)))
            infra.append_load(base, headers, warm, args.warmup, max(args.clients))
            for clients in args.clients:
                # Paused, no sync clears a chat's queued mark: one append per chat, so that each
                # sends its task as in `dual_write`, and the publisher does the same work.
                count = args.requests if phase == "paused_worker" else args.chats
                chats = infra.create_chats(base, headers, count)
                infra.wait_until(lambda: running.queue() == 0, 120, what="an empty queue")
                meter = infra.CpuMeter(running)
                meter.start()
                before = publish_counters(base)
                if phase == "paused_worker":
                    os.killpg(worker.pid, signal.SIGSTOP)
                latencies = infra.append_load(base, headers, chats, args.requests, clients)
                if phase == "paused_worker":
                    os.killpg(worker.pid, signal.SIGCONT)
                # Rows still being copied belong to this workload's cost too.
                infra.wait_until(lambda: running.queue() == 0, 120, what="an empty queue")
                after = publish_counters(base)
                publish = Counter({k: v - before.get(k, 0.0) for k, v in after.items()})
                results[(phase, clients)].append(Measured(latencies, meter.stop(), publish))
                _, _, p50, p99, *_ = infra.stats(latencies, 1e3)
                said = f"{phase:<10} clients={clients}: p50 {p50:.2f}, p99 {p99:.2f} ms"
                print(f"run {run + 1} {said}", file=sys.stderr)
    return results


def report(results: Results, args: argparse.Namespace) -> None:
    groups = sorted({g for runs in results.values() for m in runs for g in m.cpu})
    medians: dict[tuple[str, int], dict[str, float]] = {}
    summary, cpu_rows, publish_rows = [], [], []
    for (phase, clients), runs in results.items():
        per_run = [infra.stats(m.latencies, 1e3) for m in runs]
        m = {k: statistics.median(s[2 + i] for s in per_run) for i, k in enumerate(TARGETS)}
        medians[(phase, clients)] = m
        n, low, p50, p99, high, _ = infra.stats([x for r in runs for x in r.latencies], 1e3)
        summary.append([phase, clients, len(runs), n, low, m["p50"], m["p99"], p50, p99, high])
        count = [max(1, len(r.latencies)) for r in runs]
        cpu = [
            statistics.median(r.cpu.get(g, 0.0) * 1e3 / k for r, k in zip(runs, count, strict=True))
            for g in groups
        ]
        cpu_rows.append([phase, clients, *cpu, sum(cpu)])
        for i, (r, k) in enumerate(zip(runs, count, strict=True)):
            p = r.publish
            published = [p["publish seconds"] * 1e3 / k, int(p["tasks sent"]), int(p["coalesced"])]
            publish_rows.append([phase, clients, i + 1, *published])
    infra.show(
        f"append latency (ms), {args.requests} requests per run over {args.chats} fresh chats, one "
        "~0.9 KB user message each (median over runs of each run's p50 and p99; pooled)",
        [*LATENCY, "pooled p50", "pooled p99", "max"],
        summary,
    )
    infra.show(
        "CPU per request (ms; the worker's copies included), median over runs",
        ["phase", "clients", *groups, "total"],
        cpu_rows,
    )
    infra.show(
        "the API's publish (dualwrite_publish_seconds: its background publisher's batches, "
        "after the responses), per request",
        ["phase", "clients", "run", "publish ms", "tasks sent", "coalesced"],
        publish_rows,
    )
    trigger, ratios = [], []
    for clients, key in itertools.product(sorted(args.clients), TARGETS):
        bare, base = (medians[(p, clients)][key] for p in PHASES[:2])
        trigger.append([clients, key, bare, base, base / bare])
        for phase in PHASES[2:]:
            dual = medians[(phase, clients)][key]
            figure = f"{phase} / jsonb_only, {clients} client(s), {key}"
            reference = f"{phase} {dual:.3f} ms, jsonb_only {base:.3f} ms"
            target, verdict = f"<= {TARGETS[key]:.2f}x", infra.verdict(dual / base, TARGETS[key])
            ratios.append([figure, f"{dual / base:.2f}x", reference, target, verdict])
    infra.show(
        "the version triggers' cost: jsonb_only / no_trigger (medians over runs)",
        ["clients", "latency", "no_trigger ms", "jsonb_only ms", "ratio"],
        trigger,
    )
    infra.show(
        "targets, against jsonb_only measured in this run (medians over runs)", infra.FIGURE, ratios
    )


def main() -> int:
    args = infra.options(
        __doc__,
        {"requests": 150, "chats": 20, "runs": 1, "warmup": 50},
        requests=(2000, "per phase, run and clients"),
        chats=300,
        runs=(3, "runs per phase, alternating"),
        clients=("1,4", "concurrent clients, comma-separated"),
        warmup=(300, "requests after each API start"),
    )
    args.clients = [int(c) for c in args.clients.split(",")]
    with infra.stack("cdw_overhead") as running:
        results = measure(running, args)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
