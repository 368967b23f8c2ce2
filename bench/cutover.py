"""The cutover in one run on one API and worker: appends to a 5,000-message chat (request time;
WAL per append, server-wide, the worker's copies included) in `dual_write`, `table_only` and
after the contract, and its last 50 messages read in `read_table`, `table_only` and after, the
phase moved by `python -m app phase set` and `contract --yes`. Targets: appends in `table_only`
>= 50x faster (p50) and WAL after the contract >= 100x less than in `dual_write`; reads no
slower than in `read_table`.

    .venv/bin/python -m bench.cutover [--messages 5000] [--appends 200] [--reads 300] [--quick]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from bench import dataset, infra

USER = "bench-cutover"
PAGE = 50
# (figure, state) -> target ratio to the figure's reference state (the first one measured).
TARGETS = {
    ("append p50 ms", "table_only"): 50.0,
    ("WAL bytes per append", "contracted"): 100.0,
    ("read last 50 p50 ms", "table_only"): 1.0,
    ("read last 50 p50 ms", "contracted"): 1.0,
}
# The states measured, in order, and the commands that move the database into each.
STEPS = {
    "dual_write": [],
    "read_table": ["phase set verify_reads", "reconcile", "phase set read_table"],
    "table_only": ["phase set table_only"],
    "contracted": ["contract --yes"],
}
BEHIND = "SELECT count(*) FROM copilot_chat_sync_state WHERE applied_version < wanted_version"


def cli(env: dict[str, str], command: str) -> None:
    """`python -m app COMMAND` against the bench's database; stops the run if it fails."""
    argv = [sys.executable, "-m", "app", *command.split()]
    done = subprocess.run(argv, cwd=infra.ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"python -m app {command} failed:\n{done.stdout}{done.stderr}")
    print(f"python -m app {command}: {done.stdout.strip().splitlines()[-1]}", file=sys.stderr)


def settle(running: infra.Stack, contracted: bool) -> None:
    """Wait for an empty queue and every chat's copy caught up (after the contract no sync
    copies anything: only the queue counts)."""
    infra.wait_until(
        lambda: running.queue() == 0 and (contracted or infra.scalar(running.url, BEHIND) == 0),
        300,
        what="an empty sync backlog",
    )
    if contracted:
        time.sleep(0.5)  # tasks the worker had already reserved


def load_chats(http: httpx.Client, messages: int, scale: float) -> str:
    """Import the data set at `scale` around the measured chat of `messages`; the latter's id."""
    for chat in dataset.chats(dataset.shape(scale)):
        body = {"user_id": chat.user_id, "title": chat.title, "messages": chat.messages}
        http.post("/admin/chats/import", json=body).raise_for_status()
    transcript = dataset.transcript(
        random.Random(dataset.SEED), messages, datetime(2026, 1, 1, tzinfo=UTC)
    )
    body = {"user_id": USER, "title": "cutover", "messages": transcript}
    return str(http.post("/admin/chats/import", json=body).raise_for_status().json()["id"])


def timed(
    count: int, request: Callable[[], httpx.Response], ok: Callable[[httpx.Response], bool]
) -> list[float]:
    """Seconds per `request()`, one after another; every answer must pass `ok`."""
    out = []
    for _ in range(count):
        started = time.perf_counter()
        response = request()
        out.append(time.perf_counter() - started)
        if not ok(response):
            said = f"{response.status_code}: {response.text[:300]}"
            raise SystemExit(f"{response.request.method} {response.request.url} answered {said}")
    return out


def status(code: int) -> Callable[[httpx.Response], bool]:
    return lambda response: response.status_code == code


def served(response: httpx.Response) -> bool:
    """A page of the last 50 messages, served from the table."""
    page = response.json() if response.status_code == 200 else {}
    return len(page.get("messages", [])) == PAGE and page["source"] == "table"


def appends(
    http: httpx.Client, running: infra.Stack, chat: str, count: int, state: str
) -> tuple[list[float], float]:
    """Request seconds of `count` appends and the WAL bytes per append, the copies included."""
    rng, contracted = random.Random(state), state == "contracted"  # new message ids in each state

    def append() -> httpx.Response:
        body = {"message": dataset.element(rng, "user", datetime.now(UTC))}
        return http.post(f"/chats/{chat}/messages", json=body)

    timed(5, append, status(201))  # warm-up: connections, prepared statements
    settle(running, contracted)
    start = infra.scalar(running.url, "SELECT pg_current_wal_lsn()")
    seconds = timed(count, append, status(201))
    settle(running, contracted)
    wal = infra.scalar(running.url, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start,))
    return seconds, float(wal) / count


def measure(running: infra.Stack, http: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    """Per state (where measured): seconds per append, per read of the last page and per
    request floor, and WAL bytes per append."""
    out: dict[str, Any] = {"appends": {}, "wal": {}, "reads": {}, "floors": {}}
    chat = load_chats(http, args.messages, args.scale)
    page = f"/chats/{chat}/messages?limit={PAGE}"
    # The request path alone: authenticated, one transaction, no chat to read.
    missing = f"/chats/{uuid.uuid4()}/messages?limit={PAGE}"
    for state, steps in STEPS.items():
        for command in steps:
            cli(running.env, command)
        if state != "read_table":
            out["appends"][state], out["wal"][state] = appends(
                http, running, chat, args.appends, state
            )
            floor = timed(args.reads + 20, lambda: http.get(missing), status(404))
            out["floors"][state] = floor[20:]  # after 20 unmeasured, as the reads
        if state != "dual_write":
            out["reads"][state] = timed(args.reads + 20, lambda: http.get(page), served)[20:]
    print(f"chats behind after the contract: {infra.scalar(running.url, BEHIND)}", file=sys.stderr)
    return out


def versus(name: str, state: str, base: float, value: float, reference: str) -> list[str]:
    """Reference, ratio, target and verdict: appends and WAL as "x less" than the reference."""
    less = name.startswith(("append", "WAL"))
    ratio = base / value if less else value / base
    shown = [f"{base:,.3f} ({reference})" if base < 100 else f"{base:,.0f} ({reference})"]
    shown.append(f"{ratio:,.2f}x less" if less else f"{ratio:.2f}x")
    target = TARGETS.get((name, state))
    if target is None:
        return [*shown, "", ""]
    if less:
        return [*shown, f">= {target:g}x less", infra.verdict(target / ratio, 1.0)]
    return [*shown, f"<= {target:g}x", infra.verdict(ratio, target)]


def report(measured: dict[str, Any], args: argparse.Namespace) -> None:
    def ms(series: dict[str, list[float]], p: float) -> dict[str, float]:
        return {state: infra.percentile(values, p) * 1e3 for state, values in series.items()}

    figures = {  # name -> value per state; the first state is the others' reference
        "append p50 ms": ms(measured["appends"], 50),
        "append p99 ms": ms(measured["appends"], 99),
        "WAL bytes per append": measured["wal"],
        "read last 50 p50 ms": ms(measured["reads"], 50),
        "request floor p50 ms": ms(measured["floors"], 50),
    }
    rows: list[list[object]] = []
    for name, values in figures.items():
        reference, base = next(iter(values.items()))
        rows.append([f"{name}, {reference}", base, "", "", "", ""])
        rows += [
            [f"{name}, {state}", value, *versus(name, state, base, value, reference)]
            for state, value in list(values.items())[1:]
        ]
    print(
        f"\ncutover: one chat of {args.messages:,} messages (+ background chats), "
        f"{args.appends} appends and {args.reads} reads per state\n"
    )
    print(infra.table(["figure", "measured", "reference", "ratio", "target", "verdict"], rows))
    bound = figures["append p50 ms"]["dual_write"] / figures["request floor p50 ms"]["table_only"]
    print(
        "\nrequest floor: an authenticated GET of a missing chat (404; one transaction, no row). "
        f"The append ratio in table_only cannot exceed dual_write's p50 / this floor: {bound:.1f}x"
    )


def main() -> int:
    args = infra.options(
        __doc__,
        {"messages": 500, "appends": 20, "reads": 30, "scale": 0.001},
        messages=(5_000, "the measured chat's size"),
        appends=(200, "appends per state"),
        reads=(300, "reads per state"),
        scale=(0.005, "of the data set, for the background chats"),
    )
    gates = {"PHASE_GATE_MIN_SECONDS": "0", "CONTRACT_MIN_TABLE_ONLY_SECONDS": "0"}
    with infra.stack("cdw_cutover", **gates) as running:
        running.worker()
        base, headers = running.api().base, running.headers(USER, admin=True)  # admin: imports
        with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
            measured = measure(running, http, args)
    report(measured, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
