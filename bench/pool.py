"""One user against the API's database pool: a bystander appends to a small chat of their own
while an attacker runs 16 concurrent appends on their own 5,000-message chat (closed loop, a 503
sent again at once). It prints the bystander's latency alone, under the attack with the per-chat
write gate and the pool's limits (the defaults), and under the attack with the gate wide open and
a 30 s pool wait (the reference: how the API behaved without these bounds), each against its own
API process. Target: the bystander's p99 under 200 ms under the attack, with the defaults.

    .venv/bin/python -m bench.pool [--seconds 20] [--messages 5000] [--attackers 16] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx

from bench import infra

TARGET_P99_MS = 200.0
# The reference API: no per-chat gate to speak of, and a pool that makes a request wait 30 s
# (SQLAlchemy's default) rather than answer 503.
UNBOUNDED = {
    "CHAT_WRITE_CONCURRENCY": "1000",
    "USER_CONCURRENCY": "1000",
    "API_POOL_TIMEOUT_SECONDS": "30",
}


def big_chat(base: str, running: infra.Stack, user: str, messages: int) -> str:
    """A chat of `user` with `messages` ~0.9 KB messages, imported in one request."""
    body = {
        "user_id": user,
        "messages": [infra.message(f"seed-{i}") for i in range(messages)],
    }
    with httpx.Client(base_url=base, headers=running.headers("admin", admin=True)) as http:
        response = http.post("/admin/chats/import", json=body, timeout=120)
    return str(response.raise_for_status().json()["id"])


class Attack:
    """`attackers` threads appending to one chat in a closed loop until stopped."""

    def __init__(self, base: str, headers: dict[str, str], chat: str, attackers: int) -> None:
        self.base, self.headers, self.chat, self.attackers = base, headers, chat, attackers
        self.statuses: Counter[int | str] = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(attackers)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=60) as http:
            while not self.stop.is_set():
                body = {"message": infra.message(f"a-{uuid.uuid4().hex}")}
                try:
                    status: int | str = http.post(
                        f"/chats/{self.chat}/messages", json=body
                    ).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.statuses[status] += 1

    def __enter__(self) -> Attack:
        for thread in self.threads:
            thread.start()
        time.sleep(1.0)  # let the attack take hold
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def bystander(
    base: str, headers: dict[str, str], seconds: float
) -> tuple[list[float], Counter[Any]]:
    """Seconds per append of a bystander to a chat of their own, one at a time, every 50 ms."""
    latencies: list[float] = []
    failures: Counter[Any] = Counter()
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        chat = http.post("/chats", json={}).raise_for_status().json()["id"]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            body = {"message": infra.message(f"b-{uuid.uuid4().hex}")}
            started = time.perf_counter()
            try:
                status: int | str = http.post(f"/chats/{chat}/messages", json=body).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == 201:
                latencies.append(time.perf_counter() - started)
            else:
                failures[status] += 1
            time.sleep(0.05)
    return latencies, failures


def scenario(running: infra.Stack, api: Any, args: argparse.Namespace, attack: bool) -> list[Any]:
    """One row: the bystander's figures (ms), failures, and the attacker's outcomes."""
    attacker = running.headers("pool-attacker")
    chat = big_chat(api.base, running, "pool-attacker", args.messages) if attack else ""
    bystander_headers = running.headers(f"pool-bystander-{uuid.uuid4().hex[:6]}")
    if attack:
        with Attack(api.base, attacker, chat, args.attackers) as running_attack:
            latencies, failures = bystander(api.base, bystander_headers, args.seconds)
        outcomes = dict(running_attack.statuses)
    else:
        latencies, failures = bystander(api.base, bystander_headers, args.seconds)
        outcomes = {}
    n, _, p50, p99, worst, _ = infra.stats(latencies, 1000)
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items(), key=str)) or "-"
    return [n, p50, p99, worst, sum(failures.values()), shown]


def main() -> int:
    quick = {"seconds": 3.0, "messages": 200, "attackers": 4}
    args = infra.options(
        __doc__,
        quick,
        seconds=(20.0, "seconds the bystander appends in each scenario"),
        messages=(5000, "messages in the attacker's chat"),
        attackers=(16, "the attacker's concurrent appends"),
    )
    with infra.stack("cdw_bench_pool") as running:
        bounded = running.api("api-bounded")
        rows = [
            ["alone (defaults)", *scenario(running, bounded, args, attack=False)],
            ["under attack (defaults)", *scenario(running, bounded, args, attack=True)],
        ]
        for process in running.processes:
            process.stop()
        running.env.update(UNBOUNDED)
        unbounded = running.api("api-unbounded")
        rows.append(
            ["under attack (reference: unbounded)", *scenario(running, unbounded, args, True)]
        )
    infra.show(
        f"a bystander's appends (ms) while one user runs {args.attackers} concurrent appends on "
        f"their own {args.messages:,}-message chat",
        ["scenario", "n", "p50", "p99", "max", "failed", "attacker's answers"],
        rows,
    )
    p99, reference = rows[1][3], rows[2][3]
    infra.show(
        "target",
        infra.FIGURE,
        [
            [
                "bystander p99 under attack (ms)",
                p99,
                f"{reference:,.0f} unbounded; {rows[0][3]:,.1f} alone",
                f"< {TARGET_P99_MS:.0f}",
                infra.verdict(p99, TARGET_P99_MS),
            ]
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
