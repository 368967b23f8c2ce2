"""Reads and writes per chat size (100, 1,000, 5,000 messages), table vs JSONB, in one run:

- last 50 messages: from the table (`app.repositories.messages.page`) vs the JSONB queries for
  the same page (`app.repositories.chats.page`, and `jsonb_path_query_array`, the page as one
  value); the fastest per size is the reference. The server's `EXPLAIN ANALYZE` time beside each;
- a whole transcript paged backwards (pages of 50 and 100) from both;
- one append to the JSONB (`chats.append`) vs to the table (`transcript_rows.append`), in ms and
  WAL bytes (other work on the server adds to them), and the worker's sync after a JSONB append.

Targets: last-50 from the table >= 3x faster than JSONB on 5,000 messages, and flat (within
1.5x) from 100 to 5,000.

    .venv/bin/python -m bench.reads [--reads 300] [--walks 5] [--appends 30] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from app.repositories import chats as chats_repo
from app.repositories import messages as messages_repo
from app.repositories import transcript_rows
from app.services import sync
from bench import dataset, infra
from migrations.backfill import INLINE

SIZES = (100, 1_000, 5_000)
PAGE = 50
USER = "bench-reads"
TARGET_FASTER = 3.0
TARGET_FLAT = 1.5
TABLE = "table: messages.page (index on chat_id, seq)"
JSONB_ARRAY = """
SELECT jsonb_path_query_array(messages, '$[last - 49 to last]') FROM copilot_chats WHERE id = :id
"""
JSONB_APPEND = "JSONB append (chats.append, messages || ...)"
ROW_APPEND = "row append (transcript_rows.append)"
SYNC = "then the worker's sync of that chat (sync_chats)"
Samples = dict[tuple[str, int], list[float]]  # by (what, chat size)


def setup(url: str, background: float, seed: int) -> dict[int, uuid.UUID]:
    """The background data set (so the table and its indexes are not trivially small), one chat
    per size, and their rows copied with the migration's own backfill statement."""
    if background > 0:
        dataset.load(url, dataset.shape(background, seed))
    rng, chats = random.Random(seed), {}
    with psycopg.connect(url) as connection:
        for size in SIZES:
            chats[size] = uuid.UUID(int=rng.getrandbits(128), version=4)
            created = datetime(2026, 6, 1, tzinfo=UTC)
            messages = dataset.dumps(dataset.transcript(rng, size, created))
            connection.execute(
                "INSERT INTO copilot_chats (id, user_id, title, model, messages, "
                "messages_version, created_at) VALUES (%s, %s, %s, 'gpt-4o', %s, 1, %s)",
                (chats[size], USER, f"{size} messages", messages, created),
            )
        connection.execute(INLINE)
        connection.execute(
            "INSERT INTO copilot_chat_sync_state (chat_id, wanted_version, applied_version, "
            "synced_at) SELECT id, messages_version, messages_version, now() FROM copilot_chats "
            "ON CONFLICT (chat_id) DO UPDATE SET applied_version = EXCLUDED.applied_version"
        )
    infra.scalar(url, "VACUUM ANALYZE")
    infra.scalar(url, "CHECKPOINT")
    return chats


def timed(samples: Samples, key: tuple[str, int], call: Callable[[], Any]) -> Any:
    began = time.perf_counter()
    result = call()
    samples.setdefault(key, []).append((time.perf_counter() - began) * 1e3)
    return result


def last_pages(
    session: Any, chats: dict[int, uuid.UUID], args: argparse.Namespace, rng: random.Random
) -> tuple[Samples, Samples]:
    """Milliseconds of every last-50 read on every size, interleaved in shuffled order, and the
    server's execution time of each (`EXPLAIN ANALYZE` of the statement it sent)."""
    variants: dict[str, Callable[[uuid.UUID], Any]] = {
        TABLE: lambda c: messages_repo.page(session, c, limit=PAGE, before_seq=None),
        "JSONB: chats.page (jsonpath slice, rows)": lambda c: chats_repo.page(
            session, c, limit=PAGE, before_seq=None
        ),
        "JSONB: jsonb_path_query_array (one value)": lambda c: session.execute(
            text(JSONB_ARRAY), {"id": c}
        ).scalar_one(),
    }
    ms: Samples = {}
    server: Samples = {}
    order = [(v, s) for v in variants for s in SIZES]
    for _ in range(args.reads):
        rng.shuffle(order)
        for variant, size in order:
            timed(ms, (variant, size), lambda v=variant, s=size: variants[v](chats[s]))
            session.rollback()
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    for variant, size in order * args.server_runs:
        event.listen(session.get_bind(), "before_cursor_execute", capture)
        variants[variant](chats[size])
        event.remove(session.get_bind(), "before_cursor_execute", capture)
        statement, parameters = sent.pop()
        explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement
        plan = session.connection().exec_driver_sql(explain, parameters).scalar_one()
        server.setdefault((variant, size), []).append(plan[0]["Execution Time"])
        session.rollback()
    return ms, server


def walks(session: Any, chats: dict[int, uuid.UUID], args: argparse.Namespace, rng: Any) -> Samples:
    """Milliseconds per whole transcript paged backwards, from the table and from the JSONB."""

    def walk(pager: Callable[..., Any], chat: uuid.UUID, limit: int) -> None:
        before = None
        while True:
            page = pager(session, chat, limit=limit, before_seq=before)
            if len(page) < limit or page[0][0] == 0:
                return
            before = page[0][0]

    pagers = {"table": messages_repo.page, "JSONB": chats_repo.page}
    ms: Samples = {}
    for _ in range(args.walks):
        order = [(p, s, n) for p in pagers for s in SIZES for n in args.page_sizes]
        rng.shuffle(order)
        for name, size, limit in order:
            key = (f"{name}: whole transcript, pages of {limit}", size)
            timed(ms, key, lambda n=name, s=size, lim=limit: walk(pagers[n], chats[s], lim))
            session.rollback()
    return ms


def writes(
    session: Any, worker_session: Any, chats: dict[int, uuid.UUID], args: argparse.Namespace
) -> tuple[Samples, Samples, int]:
    """Appends of one element to each store, ms and WAL bytes each, and the worker's sync after
    the first JSONB appends; the number of syncs that failed (worker statement timeout)."""
    ms: Samples = {}
    wal: Samples = {}
    diff = text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:b AS pg_lsn))")

    def write(key: tuple[str, int], on: Any, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` and the commit of session `on`: ms and WAL bytes."""
        before = str(session.execute(text("SELECT pg_current_wal_lsn()")).scalar_one())
        session.commit()
        began = time.perf_counter()
        result = call(*args)
        on.commit()
        ms.setdefault(key, []).append((time.perf_counter() - began) * 1e3)
        wal.setdefault(key, []).append(int(session.execute(diff, {"b": before}).scalar_one()))
        session.commit()
        return result

    rng, clock, failed = random.Random(args.seed + 1), datetime(2026, 7, 1, tzinfo=UTC), 0
    stores = {ROW_APPEND: transcript_rows.append, JSONB_APPEND: chats_repo.append}
    for (size, chat), (store, append) in itertools.product(chats.items(), stores.items()):
        for i in range(args.appends):
            clock += timedelta(seconds=1)
            item = dataset.element(rng, "user", clock)
            written = write((store, size), session, append, session, chat, USER, [item])
            if store != JSONB_APPEND or i >= args.syncs or size not in args.sync_sizes:
                continue
            try:  # on a worker connection, its statement timeout included
                wanted = {chat: written.version}
                write((SYNC, size), worker_session, sync.sync_chats, worker_session, wanted)
            except OperationalError as exc:
                worker_session.rollback()
                failed += 1
                print(f"  sync of the {size}-message chat failed: {exc.orig}", file=sys.stderr)
    return ms, wal, failed


def by_size(samples: dict[tuple[str, int], Any]) -> list[tuple[tuple[str, int], Any]]:
    return sorted(samples.items(), key=lambda kv: (kv[0][1], kv[0][0]))


def report(ms: Samples, server: Samples, walked: Samples, written: Any) -> None:
    write_ms, wal, failed = written
    median = {key: statistics.median(values) for key, values in ms.items()}
    server_median = {key: statistics.median(values) for key, values in server.items()}
    infra.show(
        "last 50 messages (ms)",
        ["read", "messages", *infra.STATS, "server ms"],
        [
            [name, size, *infra.stats(values), server_median[(name, size)]]
            for (name, size), values in by_size(ms)
        ],
    )
    infra.show(
        "paged transcript (ms per walk)",
        ["walk", "messages", *infra.STATS],
        [[name, size, *infra.stats(values)] for (name, size), values in sorted(walked.items())],
    )
    infra.show(
        f"one append (ms; WAL bytes){f'; {failed} sync(s) FAILED' if failed else ''}",
        ["append", "messages", *infra.STATS, "WAL median", "WAL min"],
        [
            [
                name,
                size,
                *infra.stats(values),
                statistics.median(wal[(name, size)]),
                min(wal[(name, size)]),
            ]
            for (name, size), values in by_size(write_ms)
        ],
    )
    fastest = min(
        (n for n, s in ms if n.startswith("JSONB") and s == 5_000), key=lambda n: median[(n, 5_000)]
    )
    faster = median[(fastest, 5_000)] / median[(TABLE, 5_000)]
    flat = median[(TABLE, 5_000)] / median[(TABLE, 100)]
    on_server = server_median[(fastest, 5_000)] / server_median[(TABLE, 5_000)]
    jsonb, row = (JSONB_APPEND, 5_000), (ROW_APPEND, 5_000)
    time_ratio = statistics.median(write_ms[jsonb]) / statistics.median(write_ms[row])
    wal_ratio = statistics.median(wal[jsonb]) / max(1, statistics.median(wal[row]))
    reference = f"fastest JSONB: {fastest} {median[(fastest, 5_000)]:.2f} ms"
    infra.show(
        "targets and ratios (medians, same run)",
        infra.FIGURE,
        [
            [
                "last-50 at 5,000: JSONB / table",
                f"{faster:.2f}x",
                reference,
                f">= {TARGET_FASTER}x",
                infra.at_least(faster, TARGET_FASTER),
            ],
            [
                "last-50 from the table: 5,000 / 100 messages",
                f"{flat:.2f}x",
                f"{median[(TABLE, 100)]:.2f} ms at 100",
                f"<= {TARGET_FLAT}x",
                infra.verdict(flat, TARGET_FLAT),
            ],
            [
                "  server execution time only: JSONB / table at 5,000",
                f"{on_server:.1f}x",
                "",
                f">= {TARGET_FASTER}x",
                infra.at_least(on_server, TARGET_FASTER),
            ],
            ["append at 5,000: JSONB / row (ms)", f"{time_ratio:.0f}x", "ref. ~290x", "", ""],
            ["append at 5,000: JSONB / row (WAL)", f"{wal_ratio:.0f}x", "ref. ~1,900x", "", ""],
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300, help="repetitions of each last-50 read")
    parser.add_argument("--walks", type=int, default=5, help="repetitions of each paged walk")
    parser.add_argument("--appends", type=int, default=30, help="appends per store and chat size")
    parser.add_argument("--syncs", type=int, default=2, help="worker syncs after an append")
    parser.add_argument("--server-runs", type=int, default=20, help="EXPLAIN ANALYZE of reads")
    parser.add_argument("--background", type=float, default=0.1, help="data set scale around")
    parser.add_argument("--seed", type=int, default=dataset.SEED)
    parser.add_argument("--quick", action="store_true", help="few repetitions, no background")
    args = parser.parse_args()
    args.page_sizes, args.sync_sizes = (50, 100), SIZES
    if args.quick:
        args.reads, args.walks, args.appends, args.syncs, args.server_runs = 20, 1, 3, 1, 3
        args.background, args.page_sizes, args.sync_sizes = 0.0, (100,), SIZES[:1]
    with (
        infra.database("cdw_bench_reads") as url,
        infra.sessions(url, pool_size=2) as sessions,
        infra.sessions(url, worker=True) as worker_sessions,
        sessions() as session,
        worker_sessions() as worker_session,
    ):
        print("setting up the chats...", file=sys.stderr)
        chats = setup(url, args.background, args.seed)
        rng = random.Random(args.seed)  # one shuffled order after another
        ms, server = last_pages(session, chats, args, rng)
        walked = walks(session, chats, args, rng)
        written = writes(session, worker_session, chats, args)
    report(ms, server, walked, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
