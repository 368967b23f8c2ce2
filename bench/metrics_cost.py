"""What recording one sync's measurements costs a worker: the node's own metrics (prometheus_client
in multiprocess mode, as a prefork child writes them) against the reference, the Redis hash the
workers used to write (one pipeline of HINCRBYFLOAT, one round trip to a local redis-server).

    .venv/bin/python -m bench.metrics_cost [--calls 20000] [--quick]

The multiprocess mode must be chosen before prometheus_client is imported: without
PROMETHEUS_MULTIPROC_DIR the script runs itself again with a directory of its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from app.metrics import LAG_BUCKETS
from app.task_names import SYNC_MESSAGES
from harness.processes import RedisServer

ROWS = {"inserted": 1, "updated": 0, "removed": 0}
LAGS = (0.012,)


def redis_hash_write(client: object) -> Callable[[], None]:
    """The write the workers used to make per sync (`WorkerMetrics.task` before this change)."""
    import redis

    assert isinstance(client, redis.Redis)

    def write() -> None:
        fields: dict[str, float] = {f"tasks|{SYNC_MESSAGES}|applied": 1}
        for kind, count in ROWS.items():
            if count:
                fields[f"rows|{kind}"] = count
        for lag in LAGS:
            bucket = next((b for b in LAG_BUCKETS if lag <= b), "+Inf")
            fields[f"lag_bucket|{bucket}"] = fields.get(f"lag_bucket|{bucket}", 0) + 1
            fields["lag_sum"] = fields.get("lag_sum", 0) + lag
            fields["lag_count"] = fields.get("lag_count", 0) + 1
        pipe = client.pipeline(transaction=False)
        for field, amount in fields.items():
            pipe.hincrbyfloat("bench:metrics", field, amount)
        pipe.execute()

    return write


def per_call_us(write: Callable[[], None], calls: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean microseconds per call."""
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            write()
        means.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="1000 calls: checks the script")
    args = parser.parse_args()
    calls = 1000 if args.quick else args.calls
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
            sys.exit(subprocess.run([sys.executable, "-m", "bench.metrics_cost", *sys.argv[1:]],
                                    env=env).returncode)  # fmt: skip

    from tasks.metrics import WorkerMetrics

    recorder = WorkerMetrics()
    node = per_call_us(lambda: recorder.task(SYNC_MESSAGES, "applied", lags=LAGS, rows=ROWS), calls)
    server = RedisServer().start()
    try:
        client = server.client()
        reference = per_call_us(redis_hash_write(client), max(calls // 10, 100))
    finally:
        server.stop()
    print(f"one sync's metrics, {calls} calls (1 task, 1 lag, 1 row kind):")
    print(f"  node's own metrics (mmap files, in process): {node:8.1f} us per sync")
    print(f"  reference, Redis hash pipeline (1 round trip): {reference:8.1f} us per sync")
    print(f"  ratio: {reference / node:.0f}x cheaper, no network")


if __name__ == "__main__":
    main()
