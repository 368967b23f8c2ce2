"""Hostile bodies against one API process: what a bystander's `GET /healthz` sees while two
clients send, in a loop, the worst bodies the API takes in. Target: /healthz p99 < 200 ms under
each attack, beside the baseline with no attack measured in the same run.

The attacks, each authenticated (an unauthenticated body is never read):
- tiny objects: 16 MiB of `{}` to the replace route, refused (413) once its values are counted;
- values at the limit: a replace body of MAX_REQUEST_BYTES holding just under
  MAX_REQUEST_NODES values, non-ASCII strings, decoded and validated in full, refused (422) by
  its last element, so that nothing is stored and the attack repeats at full cost;
- one huge string: an append body of one MAX_MESSAGE_BYTES message of non-ASCII text, walked in
  full, refused (422) by its timestamp.

    .venv/bin/python -m bench.hostile [--seconds 20] [--clients 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from app.settings import get_settings
from bench import infra

TARGET_P99_MS = 200.0


def tiny_objects(max_bytes: int) -> bytes:
    return b'{"messages": [' + b"{}," * ((max_bytes - 40) // 3) + b"{}]}"


def values_at_the_limit(max_bytes: int, max_nodes: int) -> bytes:
    """Messages of 6 values each (the object, id, role, content, timestamp, one extra), strings
    sized to fill the body; the last message has a role no route takes."""
    count = max_nodes // 6 - 2
    text_size = max(1, (max_bytes - 200 * count) // (2 * count) // 2)  # 2 bytes a character
    text = "é" * text_size
    messages = [
        {"id": f"m{i}", "role": "user", "content": text, "timestamp": None, "x": text}
        for i in range(count)
    ]
    messages[-1]["role"] = "robot"
    return json.dumps({"messages": messages}, ensure_ascii=False).encode()


def huge_string(max_message_bytes: int) -> bytes:
    text = "é" * (max_message_bytes // 2 - 1000)
    message = {"id": "m", "role": "user", "content": text, "timestamp": "soon"}
    return json.dumps({"message": message}, ensure_ascii=False).encode()


def healthz_latencies(base: str, seconds: float) -> list[float]:
    """Seconds per `/healthz`, one request after another (10 ms apart) for `seconds`."""
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    return latencies


def under_attack(
    base: str, seconds: float, clients: int, send: Callable[[httpx.Client], int]
) -> tuple[list[float], dict[int, int]]:
    """/healthz latencies while `clients` threads call `send` in a loop; their statuses."""
    stop = threading.Event()
    statuses: dict[int, int] = {}

    def attacker() -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            while not stop.is_set():
                code = send(client)
                statuses[code] = statuses.get(code, 0) + 1

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(min(1.0, seconds / 4))  # the attack under way
    try:
        return healthz_latencies(base, seconds), statuses
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def measure(running: infra.Stack, args: argparse.Namespace) -> list[list[Any]]:
    settings = get_settings()
    api = running.api()
    headers = {**running.headers("attacker"), "Content-Type": "application/json"}
    (chat,) = infra.create_chats(api.base, running.headers("attacker"), 1)
    attacks: dict[str, tuple[str, bytes]] = {
        "tiny objects (16 MiB of {})": (
            f"/chats/{chat}/messages#put",
            tiny_objects(settings.max_request_bytes),
        ),
        "values at the limit": (
            f"/chats/{chat}/messages#put",
            values_at_the_limit(settings.max_request_bytes, settings.max_request_nodes),
        ),
        "one huge string": (
            f"/chats/{chat}/messages",
            huge_string(settings.max_message_bytes),
        ),
    }
    rows = []
    baseline = healthz_latencies(api.base, args.seconds)
    rows.append(["no attack (baseline)", "-", "-", *infra.stats(baseline, 1000)])
    for name, (target, body) in attacks.items():
        path, _, method = target.partition("#")

        def send(
            client: httpx.Client, path: str = path, method: str = method, body: bytes = body
        ) -> int:
            return client.request(method or "post", path, content=body, headers=headers).status_code

        latencies, statuses = under_attack(api.base, args.seconds, args.clients, send)
        sent = ", ".join(f"{count}x {code}" for code, count in sorted(statuses.items()))
        size = f"{len(body) / 2**20:.1f} MiB"
        rows.append([name, size, sent, *infra.stats(latencies, 1000)])
    return rows


def report(args: argparse.Namespace, rows: list[list[Any]]) -> None:
    headers = ["attack", "body", "answers", *(f"{s} ms" if s != "n" else s for s in infra.STATS)]
    infra.show(
        f"/healthz while {args.clients} clients send each attack for {args.seconds:.0f} s",
        headers,
        rows,
    )
    p99 = infra.STATS.index("p99") + 3
    worst = max(rows[1:], key=lambda row: row[p99])
    infra.show(
        "Target",
        infra.FIGURE,
        [
            [
                f"/healthz p99 under the worst attack ({worst[0]})",
                f"{worst[p99]:.1f} ms",
                f"{rows[0][p99]:.1f} ms without attack",
                f"< {TARGET_P99_MS:.0f} ms",
                infra.verdict(worst[p99], TARGET_P99_MS),
            ]
        ],
    )


def main() -> int:
    args = infra.options(
        __doc__,
        {"seconds": 2.0},
        seconds=(20.0, "seconds each attack (and the baseline) lasts"),
        clients=(2, "attacking clients"),
    )
    with infra.stack("cdw_bench_hostile") as running:
        rows = measure(running, args)
    report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
