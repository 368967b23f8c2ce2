"""Request overhead of the dual-write: the same append workload through the API in phase
`jsonb_only` and in `dual_write`, alternating over several runs, with a worker running in both;
latency per phase and the ratio dual_write / jsonb_only against the targets. A third variant,
`no_trigger` (`jsonb_only` with the version triggers disabled: the application before this
service), gives the cost of the triggers themselves.

    .venv/bin/python bench/overhead.py [--requests 2000] [--chats 300] [--runs 3]
                                       [--clients 1,4] [--quick]

Every measurement appends to fresh empty chats (so each phase sees the same chat sizes), after a
warm-up of the freshly restarted API and once the worker's queue is empty.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import infra

PHASES = ("no_trigger", "jsonb_only", "dual_write")
# latencies (s), failures, wall seconds, CPU seconds by process group, publish counters
Measured = tuple[list[float], int, float, dict[str, float], dict[str, float]]
PUBLISH_METRICS = {
    "dualwrite_publish_seconds_sum": "publish seconds",
    "dualwrite_publish_seconds_count": "publishing requests",
    'dualwrite_enqueued_total{task="chats.sync_messages"}': "tasks sent",
    'dualwrite_coalesced_total{task="chats.sync_messages"}': "coalesced",
}
TARGETS = {"p50": 1.10, "p99": 1.25}
CONTENT_BYTES = 850  # with id, role, timestamp and streamId: ~0.9 KB per element


def user_message(rng_id: str) -> dict[str, str]:
    return {
        "id": f"u-{rng_id}",
        "role": "user",
        "content": ("lorem ipsum dolor sit amet " * 40)[:CONTENT_BYTES],
        "timestamp": datetime.now(UTC).isoformat(),
    }


def publish_counters(base: str) -> dict[str, float]:
    """The API's own publish metrics (time spent publishing after commits, tasks sent)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in PUBLISH_METRICS:
            found[PUBLISH_METRICS[name]] = float(value)
    return found


def create_chats(base: str, headers: dict[str, str], count: int) -> list[str]:
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        ids = []
        for i in range(count):
            response = http.post("/chats", json={"title": f"overhead {i}"})
            response.raise_for_status()
            ids.append(response.json()["id"])
        return ids


def append_load(
    base: str, headers: dict[str, str], chats: list[str], requests: int, clients: int
) -> tuple[list[float], int, float]:
    """`requests` appends spread over `chats` (round robin) by `clients` keep-alive clients, each
    sending its next request as soon as the previous one answered. Returns (latencies in
    seconds, failures, wall seconds)."""
    counter = itertools.count()
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def client() -> None:
        mine: list[float] = []
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            while (i := next(counter)) < requests:
                body = {"message": user_message(uuid.uuid4().hex)}
                path = f"/chats/{chats[i % len(chats)]}/messages"
                started = time.perf_counter()
                try:
                    ok = http.post(path, json=body).status_code == 201
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                if ok:
                    mine.append(elapsed)
                else:
                    with lock:
                        failures[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures[0], time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per phase, run and clients")
    parser.add_argument("--chats", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3, help="runs per phase, alternating")
    parser.add_argument("--clients", default="1,4", help="concurrent clients, comma-separated")
    parser.add_argument("--warmup", type=int, default=300, help="requests after each API start")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps this working")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.chats, args.runs, args.warmup = 150, 20, 1, 50
    concurrencies = [int(c) for c in args.clients.split(",")]

    infra.services_up()
    broker = infra.RedisServer().start()
    api: infra.Process | None = None
    worker: infra.Process | None = None
    # (phase, clients) -> one entry per run: (latencies, failures, wall seconds, CPU seconds
    # by process group)
    results: dict[tuple[str, int], list[Measured]] = {
        (p, c): [] for p in PHASES for c in concurrencies
    }
    try:
        with infra.database("cdw_overhead") as database_url:
            base_env = infra.service_env(database_url, broker.url)
            from app.auth import issue_token

            headers = {"Authorization": f"Bearer {issue_token(base_env['AUTH_SECRET'], 'bench')}"}
            worker = infra.worker(base_env).start()
            port = infra.free_port()
            base = f"http://127.0.0.1:{port}"
            redis_client = broker.client()
            for run in range(args.runs):
                # ABBA order: neither phase always goes first.
                for phase in PHASES if run % 2 == 0 else PHASES[::-1]:
                    if api is not None:
                        api.stop()
                    put_phase(database_url, phase)
                    api = infra.start_api(base_env, port, name=f"api-{phase}")
                    warm = create_chats(base, headers, max(1, min(args.chats, 50)))
                    append_load(base, headers, warm, args.warmup, max(concurrencies))
                    for clients in concurrencies:
                        chats = create_chats(base, headers, args.chats)
                        infra.wait_until(
                            lambda: infra.queue_length(redis_client) == 0, 120, "an empty queue"
                        )
                        meter = infra.CpuMeter(
                            infra.service_cpu_groups(database_url, broker, api, worker)
                        )
                        meter.start()
                        before = publish_counters(base)
                        latencies, failures, wall = append_load(
                            base, headers, chats, args.requests, clients
                        )
                        # Rows still being copied belong to this workload's cost too.
                        infra.wait_until(
                            lambda: infra.queue_length(redis_client) == 0, 120, "an empty queue"
                        )
                        publish = {
                            k: v - before.get(k, 0.0) for k, v in publish_counters(base).items()
                        }
                        measured = (latencies, failures, wall, meter.stop(), publish)
                        results[(phase, clients)].append(measured)
                        s = infra.stats(measured[0])
                        print(
                            f"run {run + 1} {phase:<10} clients={clients}: "
                            f"p50 {s['p50'] * 1e3:.2f} ms  p99 {s['p99'] * 1e3:.2f} ms",
                            file=sys.stderr,
                        )
    finally:
        for process in (api, worker):
            if process is not None:
                process.stop()
        broker.stop()

    report(results, concurrencies, args)
    return 0


def put_phase(database_url: str, phase: str) -> None:
    """The phase lives in the database; `no_trigger` is `jsonb_only` without the triggers."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(
            "UPDATE dualwrite_phase SET phase = %s",
            ("jsonb_only" if phase == "no_trigger" else phase,),
        )
        state = "DISABLE" if phase == "no_trigger" else "ENABLE"
        connection.execute(f"ALTER TABLE copilot_chats {state} TRIGGER USER")


def report(
    results: dict[tuple[str, int], list[Measured]],
    concurrencies: list[int],
    args: argparse.Namespace,
) -> None:
    ms = 1e3
    per_run = []
    for (phase, clients), runs in results.items():
        for i, (latencies, failures, wall, *_) in enumerate(runs):
            s = infra.stats(latencies)
            per_run.append(
                [
                    phase,
                    clients,
                    i + 1,
                    s["n"],
                    failures,
                    len(latencies) / wall,
                    s["min"] * ms,
                    s["p50"] * ms,
                    s["p99"] * ms,
                    s["max"] * ms,
                ]
            )
    print(
        f"\nappend latency (ms), {args.requests} requests per run over {args.chats} fresh chats,"
        " one ~0.9 KB user message each\n"
    )
    print(
        infra.table(
            ["phase", "clients", "run", "ok", "failed", "req/s", "min", "p50", "p99", "max"],
            per_run,
        )
    )

    summary = []
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for (phase, clients), runs in results.items():
        pooled = [x for latencies, *_ in runs for x in latencies]
        s = infra.stats(pooled)
        m = {
            key: statistics.median(infra.stats(latencies)[key] for latencies, *_ in runs)
            for key in ("p50", "p99")
        }
        medians[(phase, clients)] = m
        summary.append(
            [
                phase,
                clients,
                len(runs),
                s["n"],
                s["min"] * ms,
                m["p50"] * ms,
                m["p99"] * ms,
                s["p50"] * ms,
                s["p99"] * ms,
                s["max"] * ms,
            ]
        )
    print("\nper phase (median over runs of each run's p50 and p99; pooled over all requests)\n")
    print(
        infra.table(
            [
                "phase",
                "clients",
                "runs",
                "requests",
                "min",
                "median p50",
                "median p99",
                "pooled p50",
                "pooled p99",
                "max",
            ],
            summary,
        )
    )

    ratios = []
    for clients in concurrencies:
        for key, target in TARGETS.items():
            base = medians[("jsonb_only", clients)][key]
            dual = medians[("dual_write", clients)][key]
            ratio = dual / base
            ratios.append(
                [
                    clients,
                    key,
                    base * ms,
                    dual * ms,
                    ratio,
                    f"<= {target:.2f}x",
                    infra.verdict(ratio, target),
                ]
            )
    cpu_report(results)
    trigger = [
        [
            clients,
            key,
            medians[("no_trigger", clients)][key] * ms,
            medians[("jsonb_only", clients)][key] * ms,
            medians[("jsonb_only", clients)][key] / medians[("no_trigger", clients)][key],
        ]
        for clients in concurrencies
        for key in TARGETS
    ]
    print("\nthe version triggers' cost: jsonb_only / no_trigger (medians over runs)\n")
    print(infra.table(["clients", "latency", "no_trigger ms", "jsonb_only ms", "ratio"], trigger))
    print("\ndual_write / jsonb_only (medians over runs), measured in this run\n")
    print(
        infra.table(
            ["clients", "latency", "jsonb_only ms", "dual_write ms", "ratio", "target", "result"],
            ratios,
        )
    )


def cpu_report(results: dict[tuple[str, int], list[Measured]]) -> None:
    """Where the time goes: CPU milliseconds per request, by process, median over runs."""
    groups = sorted({g for runs in results.values() for _, _, _, cpu, _ in runs for g in cpu})
    rows = []
    for (phase, clients), runs in results.items():
        per = [
            {g: cpu.get(g, 0.0) * 1e3 / max(1, len(lat)) for g in groups}
            for lat, _, _, cpu, _ in runs
        ]
        medians = {g: statistics.median(p[g] for p in per) for g in groups}
        rows.append([phase, clients, *(medians[g] for g in groups), sum(medians.values())])
    print("\nCPU per request (ms; the worker's copies included), median over runs\n")
    print(infra.table(["phase", "clients", *groups, "total"], rows))

    rows = []
    for (phase, clients), runs in results.items():
        for i, (latencies, _, _, _, publish) in enumerate(runs):
            n = max(1, len(latencies))
            rows.append(
                [
                    phase,
                    clients,
                    i + 1,
                    publish.get("publish seconds", 0.0) * 1e3 / n,
                    int(publish.get("tasks sent", 0)),
                    int(publish.get("coalesced", 0)),
                ]
            )
    print(
        "\nthe API's publish (dualwrite_publish_seconds: its background publisher's batches, "
        "after the responses), per request\n"
    )
    print(infra.table(["phase", "clients", "run", "publish ms", "tasks sent", "coalesced"], rows))


if __name__ == "__main__":
    sys.exit(main())
