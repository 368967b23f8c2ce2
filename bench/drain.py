"""Backlog drain: 100,000 message syncs pending while no worker runs, then a worker (prefork, -c 2)
started: rows/s until drift is 0, as a fraction of the batched-upsert ceiling measured in the
same run (Python upserts of the same rows in batches of 1,000; one row per transaction for
reference). Writes the drain curve to bench/out/drain_curve.csv and bench/out/drain_curve.png
(`-quick` before the suffix in --quick mode, so that CI never overwrites a real measurement).

The backlog goes through the real producer path: `app.services.chats.append_inbox_pair` in a
unit of work like the API's, then `app.jobs.publish_after_commit` with
`tasks.publish.bounded_publisher` to the bench's own Redis, so publishes coalesce per chat as in
production.

    .venv/bin/python bench/drain.py [--messages 100000] [--chats 2000] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dataset, infra

TARGET = 0.5
BATCH = 1_000

UPSERT = """
INSERT INTO {table} AS m
    (chat_id, message_id, role, seq, content, stream_id, model, created_at, updated_at,
     source_version)
{source}
ON CONFLICT (chat_id, message_id) DO UPDATE SET
    role = EXCLUDED.role, seq = EXCLUDED.seq, content = EXCLUDED.content,
    stream_id = EXCLUDED.stream_id, model = EXCLUDED.model, created_at = EXCLUDED.created_at,
    updated_at = now(), deleted_at = NULL, source_version = EXCLUDED.source_version
WHERE m.source_version <= EXCLUDED.source_version
"""
VALUES = "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now(), %s)"


# ---------------------------------------------------------------------------------------------
# The backlog, through the producer path


def produce(
    database_url: str,
    redis_url: str,
    chats: int,
    messages: int,
    threads: int,
    seed: int,
) -> tuple[Counter[str], float]:
    """Create `chats` chats, then append `messages` messages to them as inbox pairs, round-robin,
    from `threads` threads; every append publishes its sync after its commit. Returns the
    publish outcomes and the seconds it took."""
    from sqlalchemy import event

    from app import schemas
    from app.db import make_engine, make_sessionmaker
    from app.jobs import JobQueue, publish_after_commit
    from app.services import chats as chat_service
    from app.settings import Settings
    from tasks.publish import bounded_publisher

    settings = Settings(database_url=database_url, redis_url=redis_url)
    engine = make_engine(settings, pool_size=threads)

    # Setup only, not measured: the commits need not wait for the disk.
    @event.listens_for(engine, "connect")
    def _fast(dbapi_connection: Any, record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit = off")
        dbapi_connection.commit()

    factory = make_sessionmaker(engine)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    failures: list[str] = []

    def unit_of_work(user: str, action: Callable[[chat_service.Context], Any]) -> Any:
        """What `app.api.deps.unit_of_work` does around a handler."""
        queue = JobQueue()
        with factory() as session:
            with session.begin():
                result = action(chat_service.Context(session, queue, settings, user))
            publish_after_commit(queue, local.publish)
        return result

    local = threading.local()

    def counting(publish: Callable[[Any], bool]) -> Callable[[Any], bool]:
        def send(job: Any) -> bool:
            sent = publish(job)
            with lock:
                outcomes["tasks sent" if sent else "publishes coalesced"] += 1
            return sent

        return send

    def client(index: int, owned: list[uuid.UUID], pairs: int) -> None:
        local.publish = counting(bounded_publisher(settings))
        rng = random.Random(seed * 7919 + index)
        text = dataset.text_source(seed)
        clock = datetime.now(UTC)
        try:
            for n in range(pairs):
                chat_id = owned[n % len(owned)]
                clock += timedelta(milliseconds=rng.randint(1, 3_000))
                user = dataset.element(rng, "user", clock, text)
                reply = dataset.element(rng, "assistant", clock, text)
                body = schemas.InboxPair.model_validate({"user": user, "assistant": reply})
                unit_of_work(
                    f"drain-{index}",
                    lambda ctx, chat_id=chat_id, body=body: chat_service.append_inbox_pair(
                        ctx, chat_id, body
                    ),
                )
        except Exception as exc:
            failures.append(f"client {index}: {type(exc).__name__}: {exc}")

    started = time.perf_counter()
    try:
        owners: list[list[uuid.UUID]] = [[] for _ in range(threads)]
        local.publish = counting(bounded_publisher(settings))
        for i in range(chats):
            chat = unit_of_work(
                f"drain-{i % threads}",
                lambda ctx: chat_service.create_chat(ctx, schemas.CreateChat(title="drain")),
            )
            owners[i % threads].append(chat.id)
        pairs = messages // 2
        workers = [
            threading.Thread(
                target=client,
                args=(i, owners[i], pairs // threads + (1 if i < pairs % threads else 0)),
            )
            for i in range(threads)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        engine.dispose()
    if failures:
        raise SystemExit("backlog producer failed: " + "; ".join(failures[:3]))
    return outcomes, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# The ceiling: Python upserts of the same rows into a scratch copy of the table


def rows_of(database_url: str) -> list[tuple[Any, ...]]:
    """The rows the worker is to write, mapped in Python from the JSONB (same columns)."""
    out = []
    with psycopg.connect(database_url) as connection:
        for chat_id, version, created, messages in connection.execute(
            "SELECT id, messages_version, created_at, messages FROM copilot_chats ORDER BY id"
        ):
            for seq, elem in enumerate(messages):
                stamp = elem.get("timestamp")
                try:
                    created_at = datetime.fromisoformat(stamp) if stamp else created
                except ValueError:
                    created_at = created
                out.append(
                    (
                        chat_id,
                        elem["id"],
                        elem.get("role", "unknown"),
                        seq,
                        json.dumps(elem, ensure_ascii=False, separators=(",", ":")),
                        elem.get("streamId"),
                        elem.get("model"),
                        created_at,
                        version,
                    )
                )
    return out


def scratch(database_url: str) -> None:
    """`bench_ceiling`: the same columns, indexes and foreign key as copilot_chat_messages."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS bench_ceiling")
        connection.execute("CREATE TABLE bench_ceiling (LIKE copilot_chat_messages INCLUDING ALL)")
        connection.execute(
            "ALTER TABLE bench_ceiling ADD FOREIGN KEY (chat_id) "
            "REFERENCES copilot_chats (id) ON DELETE CASCADE"
        )
        connection.execute("CHECKPOINT")


def by_key(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=lambda r: (r[0], r[1]))


def upsert_executemany(database_url: str, rows: list[tuple[Any, ...]]) -> list[float]:
    """Batches of 1,000 rows, each one `executemany` (pipelined) and one transaction."""
    statement = UPSERT.format(table="bench_ceiling", source=VALUES)
    seconds = []
    with psycopg.connect(database_url) as connection, connection.cursor() as cursor:
        for start in range(0, len(rows), BATCH):
            began = time.perf_counter()
            cursor.executemany(statement, by_key(rows[start : start + BATCH]))
            connection.commit()
            seconds.append(time.perf_counter() - began)
    return seconds


def upsert_copy(database_url: str, rows: list[tuple[Any, ...]]) -> list[float]:
    """Batches of 1,000 rows: COPY into a temp table, then one INSERT ... SELECT ... ON CONFLICT."""
    statement = UPSERT.format(
        table="bench_ceiling",
        source="SELECT chat_id, message_id, role, seq, content, stream_id, model, created_at, "
        "now(), source_version FROM incoming ORDER BY chat_id, message_id",
    )
    seconds = []
    with psycopg.connect(database_url) as connection:
        connection.execute(
            "CREATE TEMP TABLE incoming (chat_id uuid, message_id text, role text, seq int, "
            "content jsonb, stream_id text, model text, created_at timestamptz, "
            "source_version bigint) ON COMMIT DELETE ROWS"
        )
        connection.commit()
        for start in range(0, len(rows), BATCH):
            began = time.perf_counter()
            with connection.cursor().copy(
                "COPY incoming (chat_id, message_id, role, seq, content, stream_id, model, "
                "created_at, source_version) FROM STDIN"
            ) as copy:
                for row in rows[start : start + BATCH]:
                    copy.write_row(row)
            connection.execute(statement)
            connection.commit()
            seconds.append(time.perf_counter() - began)
    return seconds


def upsert_one_by_one(database_url: str, rows: list[tuple[Any, ...]]) -> list[float]:
    statement = UPSERT.format(table="bench_ceiling", source=VALUES)
    seconds = []
    with psycopg.connect(database_url) as connection:
        for row in rows:
            began = time.perf_counter()
            connection.execute(statement, row)
            connection.commit()
            seconds.append(time.perf_counter() - began)
    return seconds


def reset_scratch(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("TRUNCATE bench_ceiling")
        connection.execute("CHECKPOINT")


# ---------------------------------------------------------------------------------------------
# The drain


class Curve:
    """Rows in copilot_chat_messages and chats behind, sampled from the worker's launch on."""

    def __init__(self, database_url: str, every: float) -> None:
        self.database_url, self.every = database_url, every
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Curve:
        self.thread.start()
        return self

    def _loop(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            while not self.stop.is_set():
                rows, behind = connection.execute(
                    "SELECT (SELECT count(*) FROM copilot_chat_messages WHERE deleted_at IS NULL),"
                    " (SELECT count(*) FROM copilot_chat_sync_state "
                    "  WHERE applied_version < wanted_version)"
                ).fetchone() or (0, 0)
                self.samples.append((time.perf_counter() - self.started, rows, behind))
                self.stop.wait(self.every)

    def done(self, expected: int) -> bool:
        return bool(self.samples) and self.samples[-1][1] >= expected and self.samples[-1][2] == 0


PROFILE = infra.OUT / "drain-profile.txt"  # "-quick" is inserted in --quick mode (see main)


def start_profiler(pid: int) -> subprocess.Popen[bytes]:
    """py-spy on the worker and its pool processes, idle time (waiting on the database or the
    broker) included, collapsed stacks to bench/out/drain-profile.txt."""
    spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--idle",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(PROFILE),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    if profiler.poll() is None:
        os.killpg(profiler.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(profiler.pid, signal.SIGKILL)
            profiler.wait()


def profile_summary(pool: list[int], top: int = 12) -> list[list[Any]]:
    """Where the pool processes spent their samples: by leaf frame, and by broad kind."""
    if not PROFILE.exists():
        return []
    leaves: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    total = 0
    for line in PROFILE.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not any(f"process {p}:" in stack for p in pool):
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaves[frames[-1].strip()[:90]] += n
        text = stack.lower()
        if "psycopg" in text and ("wait" in frames[-1] or "execute" in text):
            kind = "waiting on PostgreSQL (psycopg)"
        elif "redis" in text or "kombu" in text:
            kind = "broker / Redis client (kombu, redis-py)"
        elif "sqlalchemy" in text:
            kind = "SQLAlchemy (Python)"
        elif "app/" in text or "tasks/" in text:
            kind = "service code (app/, tasks/)"
        else:
            kind = "Celery pool and other"
        kinds[kind] += n
    if not total:
        return []
    rows: list[list[Any]] = [[f"{k}", f"{v / total:.0%}"] for k, v in kinds.most_common()]
    rows.append(["-- top leaf frames --", ""])
    rows += [[k, f"{v / total:.0%}"] for k, v in leaves.most_common(top)]
    return rows


def total_drift(database_url: str) -> int:
    """Rows of drift over every chat, by the service's own checker."""
    from app.db import make_engine, make_sessionmaker, transaction
    from app.services.drift import find_drift
    from app.settings import Settings

    engine = make_engine(Settings(database_url=database_url), pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            return sum(c.drift for c in find_drift(session))
    finally:
        engine.dispose()


def first_at_or_above(samples: list[tuple[float, int, int]], rows: int) -> float:
    return next(t for t, r, _ in samples if r >= rows)


def plot(samples: list[tuple[float, int, int]], ready: float, ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [t for t, _, _ in samples]
    rows = [r for _, r, _ in samples]
    total = rows[-1]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(ts, rows, label="rows copied (worker, prefork -c 2)", color="tab:blue")
    start = next((t for t, r, _ in samples if r > 0), ready)
    for rate, style, label in (
        (ceiling, "--", f"batched-upsert ceiling ({ceiling:,.0f} rows/s)"),
        (ceiling * TARGET, ":", f"target: {TARGET:.0%} of the ceiling"),
    ):
        end = start + total / rate
        ax.plot([start, end], [0, total], style, color="gray", label=label)
    ax.axvline(ready, color="tab:green", lw=0.8, label="worker ready")
    ax.set_xlabel("seconds since the worker was launched")
    ax.set_ylabel("rows in copilot_chat_messages")
    ax.set_title(f"Backlog drain: {total:,} message rows")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def window_rates(samples: list[tuple[float, int, int]], width: float = 1.0) -> list[float]:
    """Rows/s over consecutive windows of `width` seconds, while rows were being written."""
    out = []
    begin = next((i for i, (_, r, _) in enumerate(samples) if r > 0), 0)
    t0, r0 = samples[max(0, begin - 1)][:2]
    for t, r, _ in samples[begin:]:
        if t - t0 >= width:
            out.append((r - r0) / (t - t0))
            t0, r0 = t, r
    if not out:  # drained within one window
        t1, r1 = samples[-1][:2]
        out.append((r1 - r0) / max(1e-9, t1 - t0))
    return out


def stats(name: str, values: list[float], unit_rows: int | None, reference: str) -> list[Any]:
    return [
        name,
        len(values),
        statistics.median(values),
        infra.percentile(values, 50),
        infra.percentile(values, 99),
        min(values),
        max(values),
        "" if unit_rows is None else round(unit_rows),
        reference,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="pending message syncs")
    parser.add_argument("--chats", type=int, default=2_000, help="chats they are appended to")
    parser.add_argument("--threads", type=int, default=4, help="producer threads")
    parser.add_argument("--one-by-one", type=int, default=3_000, help="rows, one per commit")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--seed", type=int, default=dataset.SEED)
    parser.add_argument("--profile", action="store_true", help="py-spy the worker pool")
    parser.add_argument("--quick", action="store_true", help="2,000 messages over 50 chats")
    args = parser.parse_args()
    tag = ""
    if args.quick:
        args.messages, args.chats, args.one_by_one = 2_000, 50, 200
        tag = "-quick"
    global PROFILE
    PROFILE = infra.OUT / f"drain-profile{tag}.txt"
    curve_csv, curve_png = infra.OUT / f"drain_curve{tag}.csv", infra.OUT / f"drain_curve{tag}.png"

    infra.services_up()
    infra.OUT.mkdir(parents=True, exist_ok=True)
    broker = infra.RedisServer().start()
    try:
        with infra.database("cdw_bench_drain") as url:
            env = infra.service_env(url, broker.url)
            os.environ.update(env)

            print(f"backlog: {args.messages:,} messages into {args.chats:,} chats", file=sys.stderr)
            outcomes, produce_seconds = produce(
                url, broker.url, args.chats, args.messages, args.threads, args.seed
            )
            queued = int(broker.client().llen("dualwrite.sync"))
            with psycopg.connect(url) as connection:
                row = connection.execute(
                    "SELECT (SELECT sum(jsonb_array_length(messages)) FROM copilot_chats),"
                    " (SELECT count(*) FROM copilot_chat_sync_state"
                    "  WHERE applied_version < wanted_version)"
                ).fetchone()
                expected, behind = (int(row[0] or 0), int(row[1])) if row else (0, 0)
            print(
                f"  {produce_seconds:.0f}s; {queued} tasks queued, {behind} chats behind",
                file=sys.stderr,
            )

            print("ceiling: Python upserts of the same rows into a scratch table", file=sys.stderr)
            rows = rows_of(url)
            scratch(url)
            ceiling_runs: dict[str, tuple[list[float], float]] = {}
            for name, method, subset in (
                ("executemany, batches of 1,000", upsert_executemany, rows),
                ("COPY + INSERT ... SELECT, batches of 1,000", upsert_copy, rows),
                ("one row per transaction", upsert_one_by_one, rows[: args.one_by_one]),
            ):
                began = time.perf_counter()
                seconds = method(url, subset)
                ceiling_runs[name] = (seconds, len(subset) / (time.perf_counter() - began))
                print(f"  {name}: {ceiling_runs[name][1]:,.0f} rows/s", file=sys.stderr)
                reset_scratch(url)
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute("DROP TABLE bench_ceiling")
                connection.execute("VACUUM ANALYZE")
                connection.execute("CHECKPOINT")
            ceiling_name, (_, ceiling) = max(
                ((k, v) for k, v in ceiling_runs.items() if "1,000" in k), key=lambda kv: kv[1][1]
            )

            print("drain: starting the worker", file=sys.stderr)
            curve = Curve(url, 0.1).start()
            worker = infra.worker(env, "drain", args.concurrency)
            profiler: subprocess.Popen[bytes] | None = None
            try:
                worker.start()
                ready = time.perf_counter() - curve.started
                if args.profile:
                    profiler = start_profiler(worker.pid)
                infra.wait_until(lambda: curve is not None and curve.done(expected), 1800, "drain")
            finally:
                curve.stop.set()
                curve.thread.join()
                pool = worker.children() if worker.proc and worker.proc.poll() is None else []
                if profiler is not None:
                    stop_profiler(profiler)
                worker.stop()
            samples = curve.samples
            task_seconds = [
                float(m)
                for m in re.findall(
                    r"succeeded in ([0-9.]+)s", worker.log_path.read_text(errors="replace")
                )
            ]
            profile_rows = profile_summary(pool) if args.profile else []
            done = first_at_or_above(samples, expected)
            first = next(t for t, r, _ in samples if r > 0)
            drift = total_drift(url)
            metrics = {
                k.decode(): float(v)
                for k, v in broker.client().hgetall("dualwrite:metrics").items()
            }
            task_outcomes = {
                k.split("|")[2]: int(v) for k, v in metrics.items() if k.startswith("tasks|")
            }

        with curve_csv.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["seconds_since_launch", "rows", "chats_behind"])
            writer.writerows((round(t, 3), r, b) for t, r, b in samples)
        plot(samples, ready, ceiling, curve_png)

        from_ready = expected / (done - ready)
        from_first = expected / max(1e-9, done - first)
        rows_table = []
        for name, (seconds, rate) in ceiling_runs.items():
            per_batch = BATCH if "1,000" in name else 1
            rows_table.append(
                stats(
                    f"ceiling: {name} (s per commit)",
                    seconds,
                    rate,
                    "16-20 K rows/s ref." if per_batch > 1 else "~1.4 K rows/s ref.",
                )
            )
        if task_seconds:
            rows_table.append(stats("drain: seconds per task (worker log)", task_seconds, None, ""))
        rows_table.append(
            stats(
                "drain: rows/s per 1 s window",
                window_rates(samples),
                from_ready,
                f">= {TARGET:.0%} of the ceiling",
            )
        )
        print(
            infra.table(
                ["measure", "runs", "median", "p50", "p99", "min", "max", "rows/s", "ref./target"],
                rows_table,
            )
        )
        print()
        fraction = from_ready / ceiling
        print(
            infra.table(
                ["drain", "value"],
                [
                    ["message syncs pending (messages appended)", args.messages],
                    ["chats", args.chats],
                    ["publishes coalesced (no task sent)", outcomes["publishes coalesced"]],
                    ["tasks sent", outcomes["tasks sent"]],
                    ["tasks in the queue when the worker started", queued],
                    *[[f"tasks run by the worker: {k}", v] for k, v in task_outcomes.items()],
                    ["rows to copy", expected],
                    ["worker ready after launch (s)", round(ready, 2)],
                    ["first row after launch (s)", round(first, 2)],
                    ["drift 0 after launch (s)", round(done, 2)],
                    ["drain rows/s (worker ready -> drift 0)", round(from_ready)],
                    ["drain rows/s (first row -> last row)", round(from_first)],
                    [f"ceiling rows/s ({ceiling_name})", round(ceiling)],
                    [
                        "drain / ceiling (target >= 50%)",
                        f"{fraction:.0%} " + ("met" if fraction >= TARGET else "MISSED"),
                    ],
                    ["drift after the drain (find_drift)", drift],
                    ["backlog produced in (s)", round(produce_seconds, 1)],
                ],
            )
        )
        print(f"curve: {curve_csv.relative_to(infra.ROOT)}, {curve_png.name}")
        if profile_rows:
            print()
            print("where the pool processes spent the drain (py-spy, idle included):")
            print(infra.table(["where", "share of samples"], profile_rows))
            print(f"profile: {PROFILE.relative_to(infra.ROOT)}")
        return 0
    finally:
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
