"""A bounded chaos run you can watch: concurrent traffic through the API while a fault loop kills
worker processes, stops Redis and terminates the worker's PostgreSQL backends; then it waits for
the system to converge and prints what happened. Drift must end at 0 with no reconcile.

    .venv/bin/python -m bench.chaos [--seconds 180] [--chats 200] [--clients 8] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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

from bench import infra

FAULTS = ["kill child", "kill worker", "stop redis", "pause redis", "terminate backends"]


def message(role: str, **extra: str) -> dict[str, str]:
    """An element without a timestamp, of a random size."""
    content = "x" * random.randint(20, 900)
    return {"id": f"{role[0]}-{uuid.uuid4().hex[:12]}", "role": role, "content": content, **extra}


class Traffic:
    """Client threads, each owning its chats, so every request they send is a valid one."""

    def __init__(self, base: str, headers: dict[str, str], chats: int, clients: int) -> None:
        self.base, self.headers, self.clients = base, headers, clients
        self.chats_per_client = max(1, chats // clients)
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        infra.in_threads(self._client, [(i,) for i in range(self.clients)])

    def _send(self, http: httpx.Client, method: str, path: str, body: Any = None) -> Any:
        """The answer's body, or None (and the failure recorded) unless it is a success."""
        try:
            response = http.request(method, path, json=body)
            failure = "" if response.is_success else f"{response.status_code} {response.text[:120]}"
        except httpx.HTTPError as exc:
            failure = type(exc).__name__
        with self.lock:
            self.counts["sent"] += 1
            if failure:
                self.failures.append(f"{method} {path}: {failure}")
        return None if failure else response.json()

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=30) as http:
            send = functools.partial(self._send, http)
            owned: list[tuple[str, list[str]]] = []
            for _ in range(self.chats_per_client):
                if created := send("POST", "/chats", {"title": f"chaos {index}"}):
                    owned.append((created["id"], []))
            while not self.stop.is_set() and owned:
                chat, ids = rng.choice(owned)
                action = rng.random()
                if action < 0.55:  # a turn: the user message, then the assistant's reply
                    user = message("user")
                    if send("POST", f"/chats/{chat}/messages", {"message": user}):
                        ids.append(user["id"])
                        reply = message("assistant", model="m")
                        path = f"/chats/{chat}/turns/{user['id']}/complete"
                        if send("POST", path, {"message": reply}):
                            ids.append(reply["id"])
                        self.counts["turns"] += 1
                elif action < 0.70:
                    pair = {"user": message("user"), "assistant": message("assistant")}
                    if send("POST", f"/chats/{chat}/inbox", pair):
                        ids += [pair["user"]["id"], pair["assistant"]["id"]]
                elif action < 0.90 and ids:  # a snapshot edit: drop one message, rewrite another
                    if got := send("GET", f"/chats/{chat}"):
                        messages = got["messages"]
                        if messages:
                            messages.pop(rng.randrange(len(messages)))
                        if messages:
                            messages[rng.randrange(len(messages))]["content"] = "edited"
                        if send("PUT", f"/chats/{chat}/messages", {"messages": messages}):
                            ids[:] = [m["id"] for m in messages]
                elif ids and len(owned) < self.chats_per_client * 2:
                    fork = {"up_to_message_id": rng.choice(ids)}
                    if forked := send("POST", f"/chats/{chat}/fork", fork):
                        got = send("GET", f"/chats/{forked['id']}")
                        owned.append(
                            (forked["id"], [m["id"] for m in got["messages"]] if got else [])
                        )


class Faults:
    """Every few seconds, one of the FAULTS (a method of this class each), chosen at random."""

    def __init__(self, running: infra.Stack, worker: Any) -> None:
        self.running, self.worker = running, worker
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self.last_fault = time.monotonic()

    def run(self, every: float) -> None:
        rng = random.Random(7)
        while not self.stop.wait(every * rng.uniform(0.5, 1.5)):
            fault = rng.choice(FAULTS)
            try:
                getattr(self, fault.replace(" ", "_"))()
                self.counts[fault] += 1
                self.last_fault = time.monotonic()
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                print(f"fault {fault} failed: {exc}", file=sys.stderr)

    def kill_child(self) -> None:
        if children := self.worker.child_pids():
            os.kill(random.choice(children), signal.SIGKILL)

    def kill_worker(self) -> None:
        self.worker.kill()
        time.sleep(1)
        self.worker.start()

    def stop_redis(self) -> None:
        self.running.broker.kill()  # every queued message is lost with it
        time.sleep(2)
        self.running.broker.start()

    def pause_redis(self) -> None:
        os.kill(self.running.broker.pid, signal.SIGSTOP)
        time.sleep(2)
        os.kill(self.running.broker.pid, signal.SIGCONT)

    def terminate_backends(self) -> None:
        infra.scalar(
            self.running.url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = 'chat-dualwrite-worker'",
        )


def run(running: infra.Stack, args: argparse.Namespace) -> tuple[Traffic, Faults, list[Any]]:
    """Traffic and faults for `args.seconds`, then the wait for the system to converge."""
    worker = running.worker()
    running.beat()
    traffic = Traffic(running.api().base, running.headers("chaos"), args.chats, args.clients)
    faults = Faults(running, worker)
    started = time.monotonic()
    traffic_thread = threading.Thread(target=traffic.run, daemon=True)
    fault_thread = threading.Thread(target=faults.run, args=(args.fault_every,), daemon=True)
    traffic_thread.start()
    fault_thread.start()
    time.sleep(args.seconds)
    faults.stop.set()
    fault_thread.join()
    traffic.stop.set()
    traffic_thread.join()
    quiet = time.monotonic()
    print(f"traffic and faults ran {quiet - started:.0f}s; converging...", file=sys.stderr)
    with contextlib.suppress(AssertionError):  # not converged: the report says so
        infra.wait_until(lambda: infra.state(running.url)[:2] == (0, 0), 300, 1.0)
    converged = time.monotonic() - faults.last_fault
    # The workers' Redis counters die with a killed Redis: the retries come from their log.
    assert worker.log_path is not None
    log = worker.log_path.read_text(errors="replace")
    retries = len(re.findall(r"failed, retry \d+ of \d+", log))
    return traffic, faults, [round(quiet - started), round(converged, 1), retries]


def report(traffic: Traffic, faults: Faults, run: list[Any], state: tuple[int, ...]) -> int:
    """Print what happened; 0 if drift and backlog ended at 0 with no failed request."""
    (seconds, converged, retries), (drift, behind, letters) = run, state
    sent, failed = traffic.counts["sent"], len(traffic.failures)
    infra.show(
        "the chaos run",
        ["measure", "value"],
        [
            ["seconds of traffic", seconds],
            ["seconds to converge after last fault", converged],
            ["chats (owned at start)", traffic.chats_per_client * traffic.clients],
            ["requests sent", sent],
            ["turns completed", traffic.counts["turns"]],
            *[[f"fault: {k}", v] for k, v in sorted(faults.counts.items())],
            ["task retries", retries],
            ["dead letters open", letters],
            ["chats behind", behind],
        ],
    )
    drifted = ["drift (rows) after the run", drift, "no reconcile", "0"]
    infra.show(
        "targets",
        infra.FIGURE,
        [
            [*drifted, "met" if drift == 0 else "MISSED"],
            ["requests failed", failed, f"of {sent}", "0", "met" if not failed else "MISSED"],
        ],
    )
    for failure in traffic.failures[:10]:
        print(f"  failed: {failure}")
    return 0 if drift == 0 and behind == 0 and not failed else 1


def main() -> int:
    quick = {"seconds": 20.0, "chats": 20, "clients": 4, "fault_every": 3.0}
    args = infra.options(__doc__, quick, seconds=180.0, chats=200, clients=8, fault_every=4.0)
    with infra.stack(
        "cdw_chaos",
        # The clients stand for many people but share one token: the per-user cap would queue
        # them as one person's burst.
        USER_CONCURRENCY="64",
        USER_QUEUE="64",
        SWEEP_INTERVAL_SECONDS="5",
        SWEEP_GRACE_SECONDS="3",
        # A task lost with its worker keeps its chat's coalescing marker until this expires; the
        # sweep resends it then. Short here, so the run converges quickly.
        COALESCE_TTL_SECONDS="10",
        RETRY_BACKOFF_BASE_SECONDS="0.5",
        RETRY_BACKOFF_MAX_SECONDS="10",
    ) as running:
        traffic, faults, measured = run(running, args)
        return report(traffic, faults, measured, infra.state(running.url))


if __name__ == "__main__":
    sys.exit(main())
