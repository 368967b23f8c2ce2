"""A bounded chaos run you can watch: concurrent traffic through the API while a fault loop kills
worker processes, stops Redis and terminates the worker's PostgreSQL backends; then it waits for
the system to converge and prints what happened. Drift must end at 0 with no reconcile.

    .venv/bin/python -m bench.chaos [--seconds 180] [--chats 200] [--clients 8] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import psycopg

from bench import infra


def message(role: str, **extra: object) -> dict[str, object]:
    return {
        "id": f"{role[0]}-{uuid.uuid4().hex[:12]}",
        "role": role,
        "content": "x" * random.randint(20, 900),
        **extra,
    }


class Traffic:
    """Client threads, each owning its chats, so every request they send is a valid one."""

    def __init__(self, base: str, headers: dict[str, str], chats: int, clients: int) -> None:
        self.base, self.headers = base, headers
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.clients = clients
        self.chats_per_client = max(1, chats // clients)

    def run(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        for t in threads:
            t.start()
        return threads

    def _send(
        self, http: httpx.Client, method: str, path: str, **kw: object
    ) -> httpx.Response | None:
        try:
            response = http.request(method, self.base + path, headers=self.headers, **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            with self.lock:
                self.counts["sent"] += 1
                self.failures.append(f"{method} {path}: {type(exc).__name__}")
            return None
        with self.lock:
            self.counts["sent"] += 1
            if response.status_code >= 300:
                self.failures.append(
                    f"{method} {path}: {response.status_code} {response.text[:120]}"
                )
        return response if response.status_code < 300 else None

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=30) as http:
            owned: list[tuple[str, list[str]]] = []
            for _ in range(self.chats_per_client):
                created = self._send(http, "POST", "/chats", json={"title": f"chaos {index}"})
                if created is not None:
                    owned.append((created.json()["id"], []))
            while not self.stop.is_set() and owned:
                chat_id, ids = rng.choice(owned)
                action = rng.random()
                if action < 0.55:  # a turn: the user message, then the assistant's reply
                    user = message("user")
                    if self._send(
                        http, "POST", f"/chats/{chat_id}/messages", json={"message": user}
                    ):
                        ids.append(str(user["id"]))
                        reply = message("assistant", model="m")
                        if self._send(
                            http,
                            "POST",
                            f"/chats/{chat_id}/turns/{user['id']}/complete",
                            json={"message": reply},
                        ):
                            ids.append(str(reply["id"]))
                        self.counts["turns"] += 1
                elif action < 0.70:
                    pair = {"user": message("user"), "assistant": message("assistant")}
                    if self._send(http, "POST", f"/chats/{chat_id}/inbox", json=pair):
                        ids += [str(pair["user"]["id"]), str(pair["assistant"]["id"])]
                elif action < 0.90 and ids:  # a snapshot edit: drop one message, rewrite another
                    got = self._send(http, "GET", f"/chats/{chat_id}")
                    if got is not None:
                        messages = got.json()["messages"]
                        if messages:
                            messages.pop(rng.randrange(len(messages)))
                        if messages:
                            messages[rng.randrange(len(messages))]["content"] = "edited"
                        if self._send(
                            http, "PUT", f"/chats/{chat_id}/messages", json={"messages": messages}
                        ):
                            ids[:] = [m["id"] for m in messages]
                elif ids and len(owned) < self.chats_per_client * 2:
                    forked = self._send(
                        http,
                        "POST",
                        f"/chats/{chat_id}/fork",
                        json={"up_to_message_id": rng.choice(ids)},
                    )
                    if forked is not None:
                        messages = self._send(http, "GET", f"/chats/{forked.json()['id']}")
                        fork_ids = (
                            [m["id"] for m in messages.json()["messages"]] if messages else []
                        )
                        owned.append((forked.json()["id"], fork_ids))


class Faults:
    """Every few seconds, one fault: a pool child SIGKILLed, the whole worker SIGKILLed and
    restarted, Redis stopped and restarted, or the worker's database backends terminated."""

    def __init__(self, broker: Any, worker: Any, database_url: str) -> None:
        self.broker, self.worker, self.database_url = broker, worker, database_url
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self.last_fault = time.monotonic()

    def run(self, every: float) -> threading.Thread:
        thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
        thread.start()
        return thread

    def _loop(self, every: float) -> None:
        rng = random.Random(7)
        while not self.stop.wait(every * rng.uniform(0.5, 1.5)):
            fault = rng.choice(
                ["kill child", "kill worker", "stop redis", "pause redis", "terminate backends"]
            )
            try:
                getattr(self, fault.replace(" ", "_"))()
                self.counts[fault] += 1
                self.last_fault = time.monotonic()
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                print(f"fault {fault} failed: {exc}", file=sys.stderr)

    def kill_child(self) -> None:
        children = self.worker.child_pids()
        if children:
            os.kill(random.choice(children), signal.SIGKILL)

    def kill_worker(self) -> None:
        self.worker.kill()
        time.sleep(1)
        self.worker.start()

    def stop_redis(self) -> None:
        self.broker.kill()  # every queued message is lost with it
        time.sleep(2)
        self.broker.start()

    def pause_redis(self) -> None:
        os.kill(self.broker.pid, signal.SIGSTOP)
        time.sleep(2)
        os.kill(self.broker.pid, signal.SIGCONT)

    def terminate_backends(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name = 'chat-dualwrite-worker'"
            )


def retries(worker: Any) -> int:
    """Retries the workers logged (their Redis counters die with a killed Redis)."""
    return len(re.findall(r"failed, retry \d+ of \d+", worker.log_path.read_text(errors="replace")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fault-every", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="20 s, 20 chats: keeps this working")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.chats, args.clients, args.fault_every = 20, 20, 4, 3.0

    with infra.stack(
        "cdw_chaos",
        SWEEP_INTERVAL_SECONDS="5",
        SWEEP_GRACE_SECONDS="3",
        # A task lost with its worker keeps its chat's coalescing marker until this expires; the
        # sweep resends it then. Short here, so the run converges quickly.
        COALESCE_TTL_SECONDS="10",
        RETRY_BACKOFF_BASE_SECONDS="0.5",
        RETRY_BACKOFF_MAX_SECONDS="10",
    ) as running:
        worker = running.worker()
        running.beat()
        base = running.api().base
        traffic = Traffic(base, running.headers("chaos"), args.chats, args.clients)
        faults = Faults(running.broker, worker, running.url)
        started = time.monotonic()
        clients = traffic.run()
        fault_thread = faults.run(args.fault_every)
        time.sleep(args.seconds)
        faults.stop.set()
        fault_thread.join()
        traffic.stop.set()
        for t in clients:
            t.join()
        quiet = time.monotonic()
        print(f"traffic and faults ran {quiet - started:.0f}s; converging...", file=sys.stderr)
        with contextlib.suppress(AssertionError):  # not converged: the report says so
            infra.wait_until(lambda: infra.state(running.url)[:2] == (0, 0), 300, 1.0)
        converged = time.monotonic()
        return report(
            traffic,
            faults,
            retries(worker),
            infra.state(running.url),
            {
                "seconds of traffic": round(quiet - started),
                "seconds to converge after last fault": round(converged - faults.last_fault, 1),
            },
        )


def report(
    traffic: Traffic,
    faults: Faults,
    retried: int,
    state: tuple[int, int, int],
    times: dict[str, float],
) -> int:
    """Print what happened; 0 if drift and backlog ended at 0 with no failed request."""
    drift, behind, letters = state
    infra.show(
        "the chaos run",
        ["measure", "value"],
        [
            *[[k, v] for k, v in times.items()],
            ["chats (owned at start)", traffic.chats_per_client * traffic.clients],
            ["requests sent", traffic.counts["sent"]],
            ["turns completed", traffic.counts["turns"]],
            *[[f"fault: {k}", v] for k, v in sorted(faults.counts.items())],
            ["task retries", retried],
            ["dead letters open", letters],
            ["chats behind", behind],
        ],
    )
    infra.show(
        "targets",
        infra.FIGURE,
        [
            [
                "drift (rows) after the run",
                drift,
                "no reconcile",
                "0",
                "met" if drift == 0 else "MISSED",
            ],
            [
                "requests failed",
                len(traffic.failures),
                f"of {traffic.counts['sent']}",
                "0",
                "met" if not traffic.failures else "MISSED",
            ],
        ],
    )
    for failure in traffic.failures[:10]:
        print(f"  failed: {failure}")
    return 0 if drift == 0 and behind == 0 and not traffic.failures else 1


if __name__ == "__main__":
    sys.exit(main())
